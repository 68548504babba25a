//! Backends that go away and come back: the harness's restartable Redis and PostgreSQL, and how usage and
//! billing answer while their backend is down and after it returns.

use integration_tests::{spawn_restartable_postgres, spawn_restartable_redis};
use sqlx::{Connection, PgConnection};

async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_killed_redis_starts_again_on_its_port_with_its_data() {
    let mut redis = spawn_restartable_redis(&[]).await;
    let url = redis.url();
    let mut connection = redis_connection(&url).await;
    let _: () = redis::cmd("SET")
        .arg("kept")
        .arg("1")
        .query_async(&mut connection)
        .await
        .unwrap();

    redis.kill().await;
    let while_down = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    redis.start().await;
    let kept: Option<String> = redis::cmd("GET")
        .arg("kept")
        .query_async(&mut redis_connection(&redis.url()).await)
        .await
        .unwrap();

    assert!(while_down.is_err());
    assert_eq!(redis.url(), url);
    assert_eq!(kept.as_deref(), Some("1"));
}

#[tokio::test]
async fn a_redis_whose_append_only_file_was_cut_forgets_the_last_writes() {
    let mut redis = spawn_restartable_redis(&[]).await;
    let mut connection = redis_connection(&redis.url()).await;
    let empty = redis.aof_len();
    let _: () = redis::cmd("SET")
        .arg("early")
        .arg("1")
        .query_async(&mut connection)
        .await
        .unwrap();
    let before_late_write = redis.wait_until_aof_longer_than(empty).await;
    let _: () = redis::cmd("SET")
        .arg("late")
        .arg("1")
        .query_async(&mut connection)
        .await
        .unwrap();
    redis.wait_until_aof_longer_than(before_late_write).await;

    redis.kill().await;
    redis.truncate_aof_to(before_late_write);
    redis.start().await;
    let mut connection = redis_connection(&redis.url()).await;
    let early: Option<String> = redis::cmd("GET")
        .arg("early")
        .query_async(&mut connection)
        .await
        .unwrap();
    let late: Option<String> = redis::cmd("GET")
        .arg("late")
        .query_async(&mut connection)
        .await
        .unwrap();

    assert_eq!(early.as_deref(), Some("1"));
    assert_eq!(late, None);
}

#[tokio::test]
async fn a_crashed_postgres_starts_again_on_its_port_with_its_data() {
    let mut postgres = spawn_restartable_postgres().await;
    let url = postgres.database_url().to_owned();
    let mut connection = PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE kept (id int)")
        .execute(&mut connection)
        .await
        .unwrap();

    postgres.kill().await;
    let while_down = PgConnection::connect(&url).await;
    postgres.start().await;
    let mut connection = PgConnection::connect(postgres.database_url())
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM kept")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    let migrations: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&mut connection)
        .await
        .unwrap();

    assert!(while_down.is_err());
    assert_eq!(rows, 0);
    assert_eq!(
        migrations,
        i64::try_from(billing::MIGRATOR.iter().count()).unwrap()
    );
}
