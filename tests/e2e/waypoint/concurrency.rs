//! Many requests at once on one HTTP/2 connection: the waypoint announces Envoy's stream
//! limit (2^31 - 1), so a client with more calls in flight than hyper's default of 200 does
//! not find the rest waiting behind them; `--http2-max-concurrent-streams` lowers it.

use crate::mesh::*;

const CALLS: usize = 250;

/// What a client sees when it starts [`CALLS`] requests at once on one HTTP/2 connection,
/// each held 5 s by v1's echo server: the stream limit the waypoint announced and each
/// answer's status. Then the most calls v1 held at once.
fn calls_at_once(mesh: &Mesh) -> (usize, Vec<u16>, u64) {
    let (announced, answers) = over_http2(&mesh.client, |sender| async move {
        // One exchange first: the waypoint's SETTINGS, with its limit, have arrived after it.
        let mut sender = sender.ready().await.unwrap();
        let request = http::Request::get(format!("http://{HOST}/first")).body(()).unwrap();
        let (response, _) = sender.send_request(request, true).unwrap();
        assert_eq!(status_and_json(response.await.unwrap()).await.0, 200);
        let announced = sender.current_max_send_streams();
        let calls: Vec<_> = (0..CALLS)
            .map(|i| {
                let mut sender = sender.clone();
                tokio::spawn(async move {
                    sender = sender.ready().await.unwrap();
                    let request = http::Request::get(format!("http://{HOST}/many/{i}"))
                        .header("x-echo-delay-ms", "5000")
                        .body(())
                        .unwrap();
                    let (response, _) = sender.send_request(request, true).unwrap();
                    match response.await {
                        Ok(response) => status_and_json(response).await.0,
                        Err(_) => 0,
                    }
                })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(tokio::time::timeout(Duration::from_secs(30), call).await.unwrap().unwrap());
        }
        (announced, answers)
    });
    (announced, answers, echo_stats(&mesh.v1)["delayedMax"].as_u64().unwrap())
}

#[test]
fn two_hundred_and_fifty_slow_requests_on_one_http2_connection_are_all_in_flight_at_once() {
    let mesh = Mesh::new(&[]);
    mesh.apply(all_to_v1());
    let (announced, answers, held) = calls_at_once(&mesh);
    assert_eq!(announced, 2_147_483_647, "the stream limit the waypoint announced");
    let ok = answers.iter().filter(|&&status| status == 200).count();
    assert_eq!(ok, CALLS, "answers: {answers:?}\n{}", mesh.waypoint.log());
    assert!(held >= CALLS as u64, "v1 held at most {held} of the {CALLS} calls at once");
}

#[test]
fn a_lower_stream_limit_makes_the_calls_beyond_it_wait() {
    let mesh = Mesh::with(Options {
        waypoint_args: &["--http2-max-concurrent-streams", "200"],
        ..Default::default()
    });
    mesh.apply(all_to_v1());
    let (announced, answers, held) = calls_at_once(&mesh);
    assert_eq!(announced, 200);
    // Waiting, not failing: every call is answered, the last fifty after the first answers.
    let ok = answers.iter().filter(|&&status| status == 200).count();
    assert_eq!(ok, CALLS, "answers: {answers:?}\n{}", mesh.waypoint.log());
    assert_eq!(held, 200, "the most calls v1 held at once through a limit of 200");
}
