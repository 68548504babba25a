//! Checks of the test harness itself: fresh databases are separate and migrated.

use integration_tests::{fresh_database, instant, timestamp};
use time::macros::datetime;

#[tokio::test]
async fn two_fresh_databases_are_distinct_and_migrated() {
    let first = fresh_database().await;
    let second = fresh_database().await;

    let first_name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&first)
        .await
        .unwrap();
    let second_name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&second)
        .await
        .unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&second)
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&first)
        .await
        .unwrap();

    assert_ne!(first_name, second_name);
    assert!(first_name.starts_with("test_"), "{first_name}");
    assert_eq!(
        applied,
        i64::try_from(billing::MIGRATOR.iter().count()).unwrap()
    );
    assert_eq!(one, 1);
}

#[test]
fn timestamps_convert_both_ways() {
    let moment = datetime!(2026-02-15 12:00:00.5 UTC);

    let round_trip = instant(&Some(timestamp(moment)));

    assert_eq!(round_trip, moment);
}
