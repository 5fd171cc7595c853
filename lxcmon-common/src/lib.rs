//! Types shared by the agent and its BPF programs: `#[repr(C)]`, `no_std`, defined once.
#![no_std]
