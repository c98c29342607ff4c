//! What every handler service runs to talk to the router: one attached
//! stream with reconnects, deliveries handed to the service's handler and
//! acked in batches, and the transactional outbox relay.
//!
//! A service never publishes straight from a handler. It writes its outgoing
//! events into its own store's `outbox` table in the same transaction as the
//! business change; the [`OutboxRelay`] publishes them afterwards and deletes
//! them once the router confirmed them durable. A crash between the two loses
//! nothing (the relay publishes again on restart) and doubles nothing: the
//! router dedupes by event id while it still holds the event, and past that
//! every service claims its effects per transaction, so a late duplicate has
//! no effect.

mod connection;
mod idempotency;
mod outbox;

pub use connection::{
    Attach, BoxFuture, ClientError, Handled, Handler, HandlerConfig, Inbound, Publisher, RouterClient,
    RouterLink,
};
pub use idempotency::{PROCESSED_MIGRATION, PROCESSED_MIGRATION_POSTGRES, claim, claimed};
pub use outbox::{
    OUTBOX_MIGRATION, OUTBOX_MIGRATION_POSTGRES, OUTBOX_WRITER_MIGRATION, OutboxRelay, push_outbox,
};
