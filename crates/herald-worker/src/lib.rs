//! Herald's workers, one module per stream they consume:
//! [`tasks`] runs task handlers and fans results out to endpoints (and
//! carries out the API's replay requests, [`replays`]),
//! [`webhooks`] signs and delivers them with retries, and [`mail`] tells an
//! endpoint's owner when it keeps failing. [`ssrf`] keeps webhooks away
//! from addresses that are not global.

pub mod handlers;
pub mod mail;
pub mod max_deliveries;
pub mod replays;
pub mod ssrf;
pub mod tasks;
pub mod webhooks;
