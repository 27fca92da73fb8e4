//! The targets, compiled into the core library as modules (see the README's architecture
//! section): each builds a [`crate::target::Target`] from a [`crate::target::TargetSpec`].

pub mod mirror;
