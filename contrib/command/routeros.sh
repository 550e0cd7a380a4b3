#!/bin/sh
# spa-server's command backend -> a MikroTik RouterOS address list, through
# the router's REST API (RouterOS 7.1 and later; docs/backends.md).
#   routeros.sh allow ADDRESS SERVICE SECONDS | remove ADDRESS SERVICE | list SERVICE
# Each service's grants go in address list spa-SERVICE, with the lease's
# time as the entry's timeout (the router ends it by itself too) and the
# comment "spa" (so `list` names only ours).  allow renews an entry that is
# there; remove of an entry that is gone succeeds.
set -eu
ROUTER=https://192.0.2.1              # the router (its www-ssl service)
NETRC=/etc/spa/routeros.netrc         # "machine 192.0.2.1 login spa password ...", 0600,
                                      # the gate keeper's user's (never in argv)
CA=/etc/spa/routeros-ca.pem           # the router's certificate authority

api() {
    curl --silent --show-error --fail --max-time 8 --netrc-file "$NETRC" --cacert "$CA" \
        -H 'content-type: application/json' "$@"
}
menu() { case $1 in *:*) echo "$ROUTER/rest/ipv6/firewall/address-list" ;;
                    *) echo "$ROUTER/rest/ip/firewall/address-list" ;; esac; }
entry() {  # the .id of ADDRESS in list spa-SERVICE, or nothing
    api -G "$(menu "$1")" --data-urlencode "list=spa-$2" --data-urlencode "address=$1" \
        | jq -r '.[0][".id"] // empty'
}

case $1 in
allow)
    id=$(entry "$2" "$3")
    if [ -n "$id" ]; then
        api -X PATCH "$(menu "$2")/$id" --data "{\"timeout\":\"${4}s\"}" >/dev/null
    else
        api -X PUT "$(menu "$2")" --data "{\"list\":\"spa-$3\",\"address\":\"$2\",\
\"timeout\":\"${4}s\",\"comment\":\"spa\"}" >/dev/null
    fi ;;
remove)
    id=$(entry "$2" "$3")
    [ -z "$id" ] || api -X DELETE "$(menu "$2")/$id" >/dev/null ;;
list)
    for family in 192.0.2.0 ::; do
        api -G "$(menu $family)" --data-urlencode "list=spa-$2" --data-urlencode "comment=spa" \
            | jq -r '.[].address'
    done ;;
*) echo "usage: $0 allow|remove|list ..." >&2; exit 2 ;;
esac
