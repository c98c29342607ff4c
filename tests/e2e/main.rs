//! End-to-end tests: real services on ephemeral ports, real gRPC, real
//! stores in temporary directories. One binary, a module per area.

mod bad_input;
mod bench;
mod chaos;
mod deploy;
mod flows;
mod idempotency;
mod interop;
mod overload;
mod processes;
mod replicas;
mod router;
mod storage;
mod support;
