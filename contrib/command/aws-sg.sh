#!/bin/sh
# spa-server's command backend -> an AWS EC2 security group, through the
# aws CLI (v2; docs/backends.md).
#   aws-sg.sh allow ADDRESS PROTOCOL PORT | remove ADDRESS PROTOCOL PORT | list PROTOCOL PORT
# Each grant is one ingress rule, its description "spa" (so `list` names
# only ours).  A security group keeps no time: spa-server removes each
# grant at its end.  allow of a rule that is there (a renewal) and remove of
# one that is gone succeed.
set -eu
GROUP=sg-0123456789abcdef0
export AWS_REGION=eu-central-1
export AWS_SHARED_CREDENTIALS_FILE=/etc/spa/aws-credentials  # 0600, the gate keeper's user's:
export AWS_CONFIG_FILE=/etc/spa/aws-config                   # an IAM user that may change only
                                                             # this group (the unit has no HOME)
permission() {
    case $1 in
    *:*) echo "IpProtocol=$2,FromPort=$3,ToPort=$3,Ipv6Ranges=[{CidrIpv6=$1/128,Description=spa}]" ;;
    *)   echo "IpProtocol=$2,FromPort=$3,ToPort=$3,IpRanges=[{CidrIp=$1/32,Description=spa}]" ;;
    esac
}
run() {  # the aws CLI; a duplicate (renewal) or a missing rule (gone) is no failure
    out=$(aws "$@" 2>&1) && return 0
    case $out in *InvalidPermission.Duplicate*|*InvalidPermission.NotFound*) return 0 ;; esac
    echo "$out" >&2; return 1
}

case $1 in
allow)  run ec2 authorize-security-group-ingress --group-id "$GROUP" \
            --ip-permissions "$(permission "$2" "$3" "$4")" ;;
remove) run ec2 revoke-security-group-ingress --group-id "$GROUP" \
            --ip-permissions "$(permission "$2" "$3" "$4")" ;;
list)   aws ec2 describe-security-group-rules --filters "Name=group-id,Values=$GROUP" \
            --query "SecurityGroupRules[?!IsEgress && IpProtocol=='$2' && FromPort==\`$3\` && Description=='spa'].[CidrIpv4 || CidrIpv6]" \
            --output text ;;
*) echo "usage: $0 allow|remove|list ..." >&2; exit 2 ;;
esac
