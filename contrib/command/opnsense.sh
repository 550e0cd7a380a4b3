#!/bin/sh
# spa-server's command backend -> an OPNsense alias, through its API
# (/api/firewall/alias_util; docs/backends.md).
#   opnsense.sh allow ADDRESS SERVICE | remove ADDRESS SERVICE | list SERVICE
# Each service has an alias spa_SERVICE of type "External (advanced)" (its
# content is the pf table only, never written to config.xml), used as the
# source of a pass rule for the service's port.  The table keeps no time:
# spa-server removes each grant at its end.
set -eu
FIREWALL=https://192.0.2.1            # the OPNsense web interface
NETRC=/etc/spa/opnsense.netrc         # "machine 192.0.2.1 login KEY password SECRET", 0600,
                                      # the gate keeper's user's (never in argv)
CA=/etc/spa/opnsense-ca.pem

api() {
    curl --silent --show-error --fail --max-time 8 --netrc-file "$NETRC" --cacert "$CA" "$@"
}
done_or_fail() { jq -e '.status == "done"' >/dev/null; }

case $1 in
allow)  api -X POST -H 'content-type: application/json' --data "{\"address\":\"$2\"}" \
            "$FIREWALL/api/firewall/alias_util/add/spa_$3" | done_or_fail ;;
remove) api -X POST -H 'content-type: application/json' --data "{\"address\":\"$2\"}" \
            "$FIREWALL/api/firewall/alias_util/delete/spa_$3" | done_or_fail ;;
list)   api "$FIREWALL/api/firewall/alias_util/list/spa_$2" | jq -r '.rows[].ip' ;;
*) echo "usage: $0 allow|remove|list ..." >&2; exit 2 ;;
esac
