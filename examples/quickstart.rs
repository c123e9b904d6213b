//! Vault's PostgreSQL quick start, with credbroker.
//!
//! `cargo run --example quickstart` starts a throwaway PostgreSQL server and walks through configuring a role,
//! issuing credentials, logging in with them, renewing and revoking. Give a connection string as the first
//! argument to run against your own server instead (its admin user must be allowed to create roles).

use std::error::Error;
use std::time::Duration;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, Role};

fn main() -> Result<(), Box<dyn Error>> {
    let given = std::env::args().nth(1);
    let (server, connection) = match given {
        Some(connection) => (None, connection),
        None => {
            let pg = TestPostgres::start()?;
            println!(
                "Started a throwaway PostgreSQL server on 127.0.0.1:{}\n",
                pg.port()
            );
            let connection = pg.connection_string();
            (Some(pg), connection)
        }
    };

    println!("$ configure connection (admin user, sslmode=disable for this local server)");
    let broker = Broker::builder()
        .connection(connection)
        .lease(Duration::from_secs(3600), Duration::from_secs(24 * 3600))
        .build()?;
    println!("Success! Connected and verified the admin user may create roles.\n");

    println!("$ write role production");
    broker.write_role("production", Role::new())?;
    println!("Success! Data written to: postgresql/roles/production\n");

    println!("$ read postgresql/creds/production");
    let creds = broker.creds("production")?;
    println!("Key             Value");
    println!("lease_id        {}", creds.lease_id());
    println!("lease_duration  {}", creds.lease_duration().as_secs());
    println!("password        {}", creds.password());
    println!("username        {}\n", creds.username());

    if let Some(pg) = &server {
        println!("$ log in as {}", creds.username());
        let mut client = pg.login(creds.username(), creds.password())?;
        let row = client.query_one("SELECT current_user::text, now()::text", &[])?;
        let (user, now): (String, String) = (row.get(0), row.get(1));
        println!("Logged in: current_user = {user}, server time {now}\n");
    }

    println!("$ renew {} increment=1800", creds.lease_id());
    let lease = broker.renew(creds.lease_id(), Some(Duration::from_secs(1800)))?;
    println!(
        "Success! Lease now expires at {} (VALID UNTIL moved)\n",
        humantime::format_rfc3339_seconds(lease.expires_at())
    );

    println!("$ revoke {}", creds.lease_id());
    broker.revoke(creds.lease_id())?;
    println!("Success! Revoked lease {}", creds.lease_id());
    if let Some(pg) = &server {
        match pg.login(creds.username(), creds.password()) {
            Ok(_) => return Err("login still works after revoke".into()),
            Err(e) => println!("Logging in again is refused: {}", credbroker_error_text(&e)),
        }
    }
    Ok(())
}

fn credbroker_error_text(e: &postgres::Error) -> String {
    e.as_db_error()
        .map(|db| db.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}
