//! vmar: VM I/O access redirection.
//!
//! The modules follow the data flow: [`scan`] hashes an image's blocks, [`catalog`] stores
//! them and finds each block's canonical copy, [`map`] holds the resulting translation map,
//! [`table`] turns it into a device-mapper table, and [`verify`] proves a map serves exactly
//! the image's bytes. [`protocol`], [`server`], [`service`] and [`client`] connect `vmarctl` to
//! `vmard`; [`clients`] bounds what clients may hold.

pub mod backup;
pub mod binding;
pub mod budget;
pub mod catalog;
pub mod check;
pub mod client;
pub mod clients;
pub mod config;
pub mod device;
pub mod digests;
pub mod error;
pub mod fault;
pub mod fleet;
pub mod guard;
pub mod hash;
pub mod holds;
pub mod hook;
pub mod image;
pub mod index;
pub mod instance;
pub mod kernel;
pub mod libvirt;
pub mod map;
pub mod metrics;
pub mod name;
pub mod nova;
pub mod overlay;
pub mod policy;
pub mod prefetch;
pub mod progress;
pub mod protocol;
pub mod records;
pub mod roots;
pub mod sample;
pub mod scan;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod sidecar;
pub mod spill;
pub mod stats;
pub mod sys;
pub mod table;
pub mod time;
pub mod units;
pub mod verify;
pub mod watch;
pub mod workset;

pub use error::{Error, Result};
