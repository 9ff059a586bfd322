#![no_std]
// This library target exists so that the agent's build script can depend on this crate
// and be rebuilt when it changes (see agent/build.rs, as in aya-template).
