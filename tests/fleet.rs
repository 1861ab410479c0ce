//! A fleet of replicas sharing one token through a real `redis-server`: one exchange for the
//! fleet, fleet-wide 401s and backoff, Redis down without failed requests, nothing secret in
//! Redis.

mod common;

use std::time::Duration;

use common::fleet::{Fleet, Redis, cache_key};
use common::{SECRET, client, get, send};
use http::StatusCode;
use tokengate::sandbox::auth::Fault;

/// Sends `n` concurrent requests spread round-robin over the fleet's replicas; their statuses.
async fn spread(fleet: &Fleet, n: usize) -> Vec<StatusCode> {
    let client = client();
    let requests = (0..n).map(|i| {
        let replica = &fleet.replicas[i % fleet.replicas.len()];
        let url = format!("http://{}/fleet/{i}", replica.proxy);
        let client = client.clone();
        async move { send(&client, get(&url)).await.0 }
    });
    futures_util::future::join_all(requests).await
}

/// [`spread`], asserting that every answer is 200.
async fn all_ok(fleet: &Fleet, n: usize) {
    let statuses = spread(fleet, n).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
}

/// Waits until every replica holds a token.
async fn all_hold_tokens(fleet: &Fleet) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let mut all = true;
            for r in &fleet.replicas {
                all &= r
                    .gateway
                    .credential("partner")
                    .unwrap()
                    .current()
                    .await
                    .is_some();
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every replica gets a token");
}

/// The `Authorization` value each replica would send now.
async fn tokens(fleet: &Fleet) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for r in &fleet.replicas {
        let token = r.gateway.credential("partner").unwrap().current().await;
        out.push(token.map(|t| t.expose().to_owned()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_cold_replicas_share_one_exchange_for_300_requests() {
    let redis = Redis::start().await;
    let fleet = Fleet::start(3, &redis.url(), 3600).await;
    all_ok(&fleet, 300).await;
    assert_eq!(fleet.exchanges(), 1, "one exchange for the whole fleet");
    all_hold_tokens(&fleet).await;
    let held = tokens(&fleet).await;
    assert!(
        held.windows(2).all(|w| w[0] == w[1]),
        "one token in the fleet"
    );

    // Nothing secret at rest: no token, no agent secret, no sealing key in any key or value.
    let dump = redis.dump().await;
    assert!(dump.iter().any(|(k, _)| k.ends_with(":token")), "{dump:?}");
    let mut secrets: Vec<String> = fleet.sandbox.upstream.tokens();
    secrets.push(SECRET.into());
    secrets.push(cache_key());
    for (key, value) in &dump {
        for secret in &secrets {
            let value = String::from_utf8_lossy(value);
            assert!(
                !key.contains(secret.as_str()) && !value.contains(secret.as_str()),
                "{key}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_joining_a_fleet_that_holds_a_token_makes_no_exchange() {
    let redis = Redis::start().await;
    let mut fleet = Fleet::start(1, &redis.url(), 3600).await;
    all_hold_tokens(&fleet).await;
    assert_eq!(fleet.exchanges(), 1);
    fleet.add(&redis.url(), "").await;
    fleet.add(&redis.url(), "").await;
    all_ok(&fleet, 30).await;
    all_hold_tokens(&fleet).await;
    assert_eq!(
        fleet.exchanges(),
        1,
        "the new replicas read the fleet's token"
    );
    let admin = format!("http://{}/admin/credentials", fleet.replicas[2].admin);
    let (_, _, body) = send(&client(), get(&admin)).await;
    let body = common::json(&body);
    assert_eq!(body["partner"]["token_origin"], "fleet", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_costs_the_fleet_one_new_exchange() {
    let redis = Redis::start().await;
    let fleet = Fleet::start(3, &redis.url(), 3600).await;
    all_ok(&fleet, 30).await;
    all_hold_tokens(&fleet).await;
    let before = fleet.exchanges();
    fleet.sandbox.upstream.revoke_seen();
    all_ok(&fleet, 50).await;
    assert_eq!(
        fleet.exchanges() - before,
        1,
        "one new exchange for the fleet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_10_storm_over_three_replicas_makes_no_more_exchanges_than_one_replica() {
    let redis = Redis::start().await;
    let mut fleet = Fleet::start(0, &redis.url(), 3600).await;
    fleet.sandbox.auth.set_fault(Fault::Code(10));
    for _ in 0..3 {
        fleet.add(&redis.url(), "").await;
    }
    let client = client();
    let started = tokio::time::Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(3) {
        for r in &fleet.replicas {
            let (status, _, _) = send(&client, get(&format!("http://{}/storm", r.proxy))).await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "auth_rejected");
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One replica backing off 1 s, 2 s, … (each half to all of its step) makes at most 3
    // exchanges in 3 s: one at once, one after at least 0.5 s, one after at least 1 s more.
    let exchanges = fleet.exchanges();
    assert!(answered > 100, "{answered}");
    assert!(
        exchanges <= 3,
        "{exchanges} exchanges: the backoff is the fleet's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_no_request_fails_and_back_the_fleet_converges_on_one_token() {
    let redis = Redis::start().await;
    let url = redis.url();
    let fleet = Fleet::start(3, &url, 3600).await;
    all_ok(&fleet, 30).await;
    all_hold_tokens(&fleet).await;

    let place = redis.kill().await;
    // Each replica alone: a dropped token is exchanged again by each on its own.
    for r in &fleet.replicas {
        r.gateway.credential("partner").unwrap().invalidate().await;
    }
    all_ok(&fleet, 60).await;
    all_hold_tokens(&fleet).await;

    let redis = Redis::restart(place).await;
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let held = tokens(&fleet).await;
            if held.iter().all(Option::is_some) && held.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the replicas converge on one token once Redis is back");
    all_ok(&fleet, 30).await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_key_treats_the_fleets_entries_as_absent() {
    let redis = Redis::start().await;
    let mut fleet = Fleet::start(1, &redis.url(), 3600).await;
    all_hold_tokens(&fleet).await;
    assert_eq!(fleet.exchanges(), 1);
    let other = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [9u8; 32]);
    fleet.add_with_key(&redis.url(), "", &other).await;
    let client = client();
    let url = format!("http://{}/other-key", fleet.replicas[1].proxy);
    assert_eq!(send(&client, get(&url)).await.0, StatusCode::OK);
    assert_eq!(
        fleet.exchanges(),
        2,
        "it could not open the fleet's token: it made its own"
    );
}
