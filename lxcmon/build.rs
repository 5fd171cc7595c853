//! With the `ebpf` feature the agent embeds the BPF object that `cargo xtask build-ebpf` built.
//! This script refuses an object that is missing or was built from other sources than the
//! workspace holds now, naming the command to run, instead of embedding it silently.

use lxcmon_common::fingerprint::{self, INPUTS, OBJECT, STAMP};
use std::path::PathBuf;

fn main() {
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return;
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = manifest.parent().map(PathBuf::from).unwrap_or(manifest);
    for input in INPUTS.iter().chain([&OBJECT, &STAMP]) {
        println!("cargo::rerun-if-changed={}", root.join(input).display());
    }
    let object = root.join(OBJECT);
    if !object.exists() {
        fail(&format!("the BPF object {} is missing", object.display()));
    }
    let built_from = std::fs::read_to_string(root.join(STAMP)).unwrap_or_default();
    match fingerprint::fingerprint(&root) {
        Ok(now) if now == built_from => {
            println!("cargo::rustc-env=LXCMON_BPF_OBJECT={}", object.display());
        }
        Ok(_) => fail(&format!(
            "the BPF object {} was built from other sources than lxcmon-ebpf/ and lxcmon-common/ hold now",
            object.display()
        )),
        Err(e) => fail(&format!("cannot read the BPF sources: {e}")),
    }
}

fn fail(why: &str) -> ! {
    eprintln!("error: {why}: run `cargo xtask build-ebpf` (the `ebpf` feature embeds that object)");
    std::process::exit(1);
}
