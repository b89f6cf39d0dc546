//! Types shared by the kernel side (`apm-ebpf`) and the agent. `no_std`, `#[repr(C)]`, no
//! implicit padding, sizes asserted at compile time: both sides must agree byte for byte.
#![no_std]
