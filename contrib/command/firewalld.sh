#!/bin/sh
# spa-server's command backend -> firewalld rich rules with a timeout
# (firewall-cmd; docs/backends.md), for a host whose firewall firewalld owns.
#   firewalld.sh allow ADDRESS FAMILY PROTOCOL PORT SECONDS | remove ADDRESS FAMILY PROTOCOL PORT
#                | list PROTOCOL PORT
# Runtime rules only (never --permanent): a firewalld restart or reload
# drops them, and spa-server's next start reconciles.  firewalld ends each
# rule at its timeout by itself; a renewal removes the rule and adds it with
# the new timeout (adding one that is there would keep the old timeout).
set -eu
ZONE=public

rule() { echo "rule family=\"$2\" source address=\"$1\" port port=\"$4\" protocol=\"$3\" accept"; }

case $1 in
allow)
    firewall-cmd --quiet --zone="$ZONE" --remove-rich-rule="$(rule "$2" "$3" "$4" "$5")" || true
    firewall-cmd --quiet --zone="$ZONE" --add-rich-rule="$(rule "$2" "$3" "$4" "$5")" \
        --timeout="${6}s" ;;
remove)
    firewall-cmd --quiet --zone="$ZONE" --remove-rich-rule="$(rule "$2" "$3" "$4" "$5")" ;;
list)
    firewall-cmd --zone="$ZONE" --list-rich-rules \
        | sed -n "s/^rule family=\"ipv[46]\" source address=\"\([^\"]*\)\" port port=\"$3\" protocol=\"$2\" accept\$/\1/p" ;;
*) echo "usage: $0 allow|remove|list ..." >&2; exit 2 ;;
esac
