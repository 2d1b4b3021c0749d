//! The virtual network device between smoltcp and the caller's packet channel.

use std::sync::Arc;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::{Counters, PacketSink};

/// A `Medium::Ip` device: the driver places one inbound packet at a time in `rx` before
/// asking smoltcp to process it; transmitted packets go straight to the sink.
pub(crate) struct VirtualDevice {
    pub(crate) rx: Option<Vec<u8>>,
    sink: Box<dyn PacketSink>,
    scratch: Vec<u8>,
    mtu: usize,
    counters: Arc<Counters>,
}

impl VirtualDevice {
    pub(crate) fn new(sink: Box<dyn PacketSink>, mtu: usize, counters: Arc<Counters>) -> Self {
        Self {
            rx: None,
            sink,
            scratch: Vec::with_capacity(mtu),
            mtu,
            counters,
        }
    }
}

impl VirtualDevice {
    /// Lets the sink send what it held back this round.
    pub(crate) fn flush(&mut self) {
        self.sink.flush();
    }
}

impl phy::Device for VirtualDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.take()?;
        Some((
            RxToken(packet),
            TxToken {
                sink: &mut *self.sink,
                scratch: &mut self.scratch,
                counters: &self.counters,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            sink: &mut *self.sink,
            scratch: &mut self.scratch,
            counters: &self.counters,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Checksums are computed and verified in software (the default): packets come from
        // the network and may be damaged or forged.
        caps
    }
}

pub(crate) struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

pub(crate) struct TxToken<'a> {
    sink: &'a mut dyn PacketSink,
    scratch: &'a mut Vec<u8>,
    counters: &'a Counters,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.scratch.clear();
        self.scratch.resize(len, 0);
        let result = f(self.scratch);
        Counters::add(&self.counters.packets_out, 1);
        Counters::add(&self.counters.bytes_out, len as u64);
        self.sink.send(self.scratch);
        result
    }
}
