//! The eBPF monitor: loads apm-ebpf, polls its maps, consumes its ring buffer.
