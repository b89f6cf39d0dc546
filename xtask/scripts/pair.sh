# Sourced by the measurement scripts (cpu-at-rate.sh, flat-out-rss.sh, outage-heap.sh): one
# apm-listener writing to /dev/shm and one agent at its defaults sending to it, in a fresh directory.
#   start_pair BIN_DIR [EXTRA_TOML]   sets D (the directory), SOCK (the agent's datagram socket),
#                                     STORED (the listener's file), ADDR, LP and AP (the two pids).
#                                     HEAPTRACK="heaptrack -o FILE" runs the agent under it;
#                                     PAIR_EBPF=off turns its eBPF monitor off (default on);
#                                     PAIR_SINK=count puts apm-bench-sink (counts and acks, stores
#                                     nothing; an outage restarts it elsewhere) in the listener's
#                                     place: read the count with `stored`, not $STORED;
#                                     PAIR_COMPRESSION=none|gzip sets central.compression
#                                     (default zstd, the agent's default).
#   stop_listener / start_listener    a listener outage: stop it, start it again on ADDR.
#   stop_pair                         stops both and removes what they wrote.
start_listener() {
  if [ "${PAIR_SINK:-}" = count ]; then
    $PAIR_BIN/apm-bench-sink $D/count >> $D/l.out 2>>$D/l.log & LP=$!
  else
    $PAIR_BIN/apm-listener --listen ${ADDR:-127.0.0.1:0} --out $STORED >> $D/l.out 2>>$D/l.log & LP=$!
  fi
  for _ in $(seq 50); do grep -q "listening on" $D/l.out && break; sleep 0.1; done
  ADDR=$(grep -o "listening on [^ ]*" $D/l.out | tail -1 | awk '{print $3}')
}

# Profiles stored so far: lines in the listener's file, or what apm-bench-sink counted.
stored() {
  if [ "${PAIR_SINK:-}" = count ]; then
    awk '{ print $1 + $2 }' $D/count 2>/dev/null || echo 0
  else
    wc -l < $STORED
  fi
}

stop_listener() { kill $LP; wait $LP 2>/dev/null; : > $D/l.out; }

start_pair() {
  local extra=${2:-}
  PAIR_BIN=$1; ADDR=
  D=$(mktemp -d /tmp/apm-pair.XXXX); mkdir -p $D/run /dev/shm/$(basename $D)
  SOCK=$D/run/l.sock; STORED=/dev/shm/$(basename $D)/p.jsonl
  start_listener
  cat > $D/agent.toml <<T
[ingest]
socket = "$SOCK"
stream_socket = "$D/run/ls.sock"
[central]
endpoint = "http://$ADDR"
compression = "${PAIR_COMPRESSION:-zstd}"
[spool]
dir = "$D/spool"
max_bytes = 268435456
[ebpf]
enabled = "${PAIR_EBPF:-on}"
[control]
runtime_dir = "$D/run"
state_dir = "$D/state"
pid_file = "$D/run/agent.pid"
metrics_listen = "127.0.0.1:0"
$extra
T
  ${HEAPTRACK:-} $PAIR_BIN/apm-agent --config $D/agent.toml run 2>$D/agent.log &
  for _ in $(seq 100); do [ -S $SOCK ] && break; sleep 0.1; done
  # Under heaptrack the agent is a child of its wrapper: find it by its config.
  AP=$(pgrep -f "apm-agent --config $D/agent.toml" | tail -1)
}

stop_pair() {
  kill $AP; sleep 2; kill $LP; wait 2>/dev/null
  rm -rf $D /dev/shm/$(basename $D)
}
