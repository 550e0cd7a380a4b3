#!/usr/bin/env bash
# Build the Debian package: bash scripts/build-deb.sh [OUTDIR]
# Writes OUTDIR/spa_VERSION_all.deb (OUTDIR defaults to dist/; VERSION is
# pyproject.toml's) and prints its path on the last line.  Builds in a copy
# of the checkout (the work tree gets no build files), with debian/ as it is
# (debhelper, dpkg-buildpackage -b -us -uc).  As root, installs the build
# dependencies it lacks with apt-get; otherwise names them.  Needs the
# package registries: pip fetches hatchling to build our wheel and the
# vendored wheels of debian/vendor.txt (hash-checked).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")

BUILD_DEPS=(debhelper dh-python python3 python3-pip python3-venv dpkg-dev fakeroot git)
missing=()
for pkg in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "build-deb: missing build dependencies: ${missing[*]} (apt-get install them)" >&2
        exit 2
    fi
fi

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src="$work/spa-$version"
mkdir -p "$src"
# what git would commit (tracked and new files, not the ignored ones such as .venv)
git ls-files -z --cached --others --exclude-standard \
    | (while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) \
    | tar -c --null -T - | tar -x -C "$src"
cat > "$src/debian/changelog" <<CHANGELOG
spa ($version) unstable; urgency=medium

  * Built from the repository by scripts/build-deb.sh.

 -- spa developers <spa@example.invalid>  $(date -R)
CHANGELOG
(cd "$src" && dpkg-buildpackage -b -us -uc) >"$work/build.log" 2>&1 || {
    tail -40 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (the last lines above)" >&2
    exit 1
}
grep 'build-deb: warning' "$work/build.log" >&2 || true
mkdir -p "$out"
cp "$work/spa_${version}_all.deb" "$out/"
echo "$out/spa_${version}_all.deb"
