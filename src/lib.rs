//! vmar: VM I/O access redirection.
//!
//! The modules follow the data flow: [`scan`] hashes an image's blocks, [`catalog`] stores
//! them and finds each block's canonical copy, [`map`] holds the resulting translation map,
//! [`table`] turns it into a device-mapper table, and [`verify`] proves a map serves exactly
//! the image's bytes. [`protocol`], [`server`], [`service`] and [`client`] connect `vmarctl` to
//! `vmard`; [`clients`] bounds what clients may hold.
//!
//! The modules marked `daemon` are built with the `daemon` feature (on by default) only: what
//! vmard alone runs, and the crates it needs (redb, devicemapper, loop devices, inotify).
//! Without it the library holds what vmarctl uses: the protocol and its client, the records,
//! maps, tables and statistics it prints, configuration, fleet, libvirt and overlay helpers.

#[cfg(feature = "daemon")]
pub mod backup;
#[cfg(feature = "daemon")]
pub mod binding;
pub mod budget;
#[cfg(feature = "daemon")]
pub mod catalog;
#[cfg(feature = "daemon")]
pub mod check;
pub mod client;
#[cfg(feature = "daemon")]
pub mod clients;
pub mod config;
#[cfg(feature = "daemon")]
pub mod device;
#[cfg(feature = "daemon")]
pub mod digests;
pub mod error;
pub mod fault;
pub mod fleet;
#[cfg(feature = "daemon")]
pub mod guard;
pub mod hash;
#[cfg(feature = "daemon")]
pub mod holds;
pub mod hook;
pub mod image;
#[cfg(feature = "daemon")]
pub mod index;
pub mod instance;
pub mod kernel;
pub mod libvirt;
pub mod map;
pub mod metrics;
pub mod name;
#[cfg(feature = "daemon")]
pub mod nova;
pub mod overlay;
pub mod policy;
#[cfg(feature = "daemon")]
pub mod prefetch;
pub mod progress;
pub mod protocol;
pub mod records;
#[cfg(feature = "daemon")]
pub mod roots;
#[cfg(feature = "daemon")]
pub mod sample;
pub mod scan;
#[cfg(feature = "daemon")]
pub mod server;
#[cfg(feature = "daemon")]
pub mod service;
pub mod shutdown;
pub mod sidecar;
#[cfg(feature = "daemon")]
pub mod spill;
pub mod stats;
pub mod sys;
pub mod table;
pub mod time;
pub mod units;
pub mod verify;
#[cfg(feature = "daemon")]
pub mod watch;
pub mod workset;

pub use error::{Error, Result};
