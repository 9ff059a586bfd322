//! `warren-cni`: the chained CNI plugin that hands each new pod to its node's warren
//! agent before the pod's containers start. The container runtime runs it; see
//! `warren::cni`.
fn main() -> std::process::ExitCode {
    warren::cni::plugin::main()
}
