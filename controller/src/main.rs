//! Warren's controller: Kubernetes or manifest-directory source, translation, config stream,
//! mesh CA, analyze. Not built yet: see the controller issue.
fn main() {
    eprintln!("controller: not implemented yet (tracked by the controller issue)");
    std::process::exit(2);
}
