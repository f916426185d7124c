//! Warren's waypoint: the optional L7 proxy (VirtualService, DestinationRule, HTTPRoute, L7
//! AuthorizationPolicy). Not built yet: see the waypoint issue.
fn main() {
    eprintln!("waypoint: not implemented yet (tracked by the waypoint issue)");
    std::process::exit(2);
}
