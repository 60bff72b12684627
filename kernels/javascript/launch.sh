# Starts the JavaScript kernel with the descriptors it expects (Node cannot dup2 by itself):
#   3: requests from the host (was stdin)    4: events to the host (was stdout)
#   0: /dev/null    1, 2: FIFOs that the kernel reads back and streams as stdout and stderr
# Usage: bash launch.sh NODE KERNEL_JS [NODE_ARGS...]
set -eu
node=$1
kernel=$2
shift 2
dir=$(/usr/bin/mktemp -d /tmp/.ampoule-js.XXXXXX)
/usr/bin/mkfifo -m 600 "$dir/stdout" "$dir/stderr"
exec 3<&0 4>&1 5>&2 </dev/null
exec "$node" "$@" "$kernel" "$dir" 1<>"$dir/stdout" 2<>"$dir/stderr"
