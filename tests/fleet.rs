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
    eprintln!("code 10 storm: {answered} requests over 3 replicas, {exchanges} exchanges");
    assert!(answered > 100, "{answered}");
    assert!(
        exchanges <= 3,
        "{exchanges} exchanges: the backoff is the fleet's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_no_request_fails_and_back_the_fleet_converges_on_one_token() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let redis = Redis::start().await;
    let fleet = Fleet::start(3, &redis.url(), 3600).await;
    all_ok(&fleet, 30).await;
    all_hold_tokens(&fleet).await;

    // Load throughout: every answer must be 200 while Redis dies, stays away and comes back.
    let done = AtomicBool::new(false);
    let fleet = &fleet;
    let load = async {
        let mut served = 0;
        while !done.load(Ordering::Relaxed) {
            all_ok(fleet, 30).await;
            served += 30;
        }
        served
    };
    let outage = async {
        let place = redis.kill().await;
        // Each replica alone: a dropped token is exchanged again by each on its own.
        for r in &fleet.replicas {
            r.gateway.credential("partner").unwrap().invalidate().await;
        }
        all_hold_tokens(fleet).await;
        let redis = Redis::restart(place).await;
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let held = tokens(fleet).await;
                if held.iter().all(Option::is_some) && held.windows(2).all(|w| w[0] == w[1]) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the replicas converge on one token once Redis is back");
        done.store(true, Ordering::Relaxed);
        redis
    };
    let (served, _redis) = tokio::join!(load, outage);
    eprintln!("{served} requests served through the outage, all 200");
    assert!(served >= 60, "{served} requests served through the outage");
    all_ok(fleet, 30).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_requests_send_no_redis_command() {
    let redis = Redis::start().await;
    let fleet = Fleet::start(2, &redis.url(), 3600).await;
    all_ok(&fleet, 20).await;
    all_hold_tokens(&fleet).await;
    let before = redis.commands_served().await;
    for _ in 0..100 {
        all_ok(&fleet, 100).await;
    }
    let after = redis.commands_served().await;
    assert!(before > 0, "the count sees tokengate's commands");
    assert_eq!(after - before, 0, "10,000 warm requests, no Redis command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_second_tokens_under_steady_load_renew_once_for_the_fleet() {
    let redis = Redis::start().await;
    let fleet = Fleet::start(3, &redis.url(), 3).await;
    // The measure: one replica alone, with its own sandbox, under the same load meanwhile.
    let mut alone = Fleet::start(0, "", 3).await;
    alone.add_alone().await;
    let started = tokio::time::Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(10) {
        all_ok(&fleet, 30).await;
        all_ok(&alone, 10).await;
        requests += 30;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        fleet.sandbox.upstream.expired_seen(),
        0,
        "no expired token upstream"
    );
    let (fleet_exchanges, one_replica) = (fleet.exchanges(), alone.exchanges());
    eprintln!(
        "10 s of 3 s tokens: fleet of 3 {fleet_exchanges} exchanges, one replica {one_replica}"
    );
    assert!(requests > 1000, "{requests}");
    assert!(one_replica >= 4, "the tokens were renewed: {one_replica}");
    assert!(
        fleet_exchanges <= one_replica + 1,
        "the fleet made {fleet_exchanges} exchanges, one replica {one_replica}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_active_token_per_agent_the_fleet_fails_no_request() {
    // Without a shared cache, each replica's token revokes the others'.
    let mut alone = Fleet::start(0, "", 3600).await;
    alone.sandbox.auth.set_single_active_token(true);
    for _ in 0..3 {
        alone.add_alone().await;
    }
    all_hold_tokens(&alone).await;
    let _ = spread(&alone, 300).await;
    eprintln!(
        "one active token, replicas alone: {} refusals upstream for 300 requests, {} exchanges",
        alone.sandbox.upstream.unauthorized(),
        alone.exchanges()
    );
    assert!(
        alone.sandbox.upstream.unauthorized() > 0 && alone.exchanges() > 3,
        "replicas alone revoke each other: {} refused, {} exchanges",
        alone.sandbox.upstream.unauthorized(),
        alone.exchanges()
    );

    // With one: one token for 30 s of load, nothing refused.
    let redis = Redis::start().await;
    let mut fleet = Fleet::start(0, &redis.url(), 3600).await;
    fleet.sandbox.auth.set_single_active_token(true);
    for _ in 0..3 {
        fleet.add(&redis.url(), "").await;
    }
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        all_ok(&fleet, 60).await;
    }
    assert_eq!(fleet.sandbox.upstream.unauthorized(), 0);
    assert_eq!(fleet.exchanges(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_killed_mid_exchange_is_taken_over_and_every_request_answered() {
    let redis = Redis::start().await;
    let mut fleet = Fleet::start(0, &redis.url(), 3600).await;
    fleet
        .sandbox
        .auth
        .set_fault(Fault::Delay(Duration::from_secs(3)));
    // The lease holder is a tokengate process, killed with SIGKILL while its exchange waits.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let shared = format!(
        "[shared_cache]\nurl = \"{}\"\nencryption_key = {{ env = \"CACHE_KEY\" }}\n",
        redis.url()
    );
    std::fs::write(&path, fleet.config_text(&shared, "")).unwrap();
    let mut holder = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("PARTNER_SECRET", SECRET)
        .env("CACHE_KEY", cache_key())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !redis
            .command(&["KEYS", "*:lease"])
            .await
            .unwrap()
            .contains(":lease")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the process takes the lease");
    holder.start_kill().unwrap();
    holder.wait().await.unwrap();
    assert_eq!(fleet.exchanges(), 1, "its exchange reached the auth server");
    fleet.sandbox.auth.set_fault(Fault::None);

    // A replica that needs a token waits for the dead holder's lease to lapse, then exchanges.
    fleet.add(&redis.url(), "").await;
    all_ok(&fleet, 20).await;
    assert_eq!(fleet.exchanges(), 2, "one exchange after the lease lapsed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_dropped_unpublished_is_given_back_at_once() {
    use tokengate::fleet::{Acquired, Fleet as SharedCache, FleetSettings, seal::SealingKey};
    let redis = Redis::start().await;
    let replica = || {
        let settings = FleetSettings {
            url: redis.url(),
            username: None,
            password: None,
            key: SealingKey::from_base64(&cache_key()).unwrap(),
            key_prefix: "tokengate:".into(),
            timeout: Duration::from_millis(200),
        };
        SharedCache::new(settings, tokengate::metrics::Metrics::new())
            .unwrap()
            .slot("partner", "https://auth.example/v2/auth\nagent")
    };
    let (first, second) = (replica(), replica());
    let lease_time = Duration::from_secs(60);
    let Ok(Acquired::Lease(lease)) = first.acquire(0, 0, lease_time).await else {
        panic!("the first replica takes the lease");
    };
    assert!(matches!(
        second.acquire(0, 0, lease_time).await,
        Ok(Acquired::Busy)
    ));
    drop(lease); // an exchange abandoned
    let taken = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Acquired::Lease(_)) = second.acquire(0, 0, lease_time).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(taken.is_ok(), "given back long before its 60 s lapse");
}
