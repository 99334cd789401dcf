//! The [`Persist`] trait: how a VMM object turns into saved state and back.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// An object (a device, a vCPU, the VM) that can be snapshotted and rebuilt, in the manner of
/// Firecracker's `Persist`.
///
/// [`save`](Self::save) copies out everything needed to continue the object later, as a plain
/// serializable [`State`](Self::State) with no file descriptors, pointers or guest memory in it
/// (guest memory goes to the memory file, see [`crate::memfile`]); it is called with the VM paused,
/// so it cannot fail and must not block. [`restore`](Self::restore) builds a new object from that
/// state plus the live resources the state cannot carry, its
/// [`ConstructorArgs`](Self::ConstructorArgs): the guest memory, an event fd, a backing file
/// reopened by path. A snapshot may come from an untrusted or corrupt source that still passed the
/// state file's checksum, so `restore` validates the state against the args (queue sizes, features
/// offered, addresses inside guest memory) and returns an error rather than panicking.
///
/// The VMM collects every object's state into one struct and writes it with
/// [`crate::save_state`]; it reads it back with [`crate::load_state`].
pub trait Persist: Sized {
    /// The saved state: plain data that bincode can write and read.
    type State: Serialize + DeserializeOwned;
    /// The live resources `restore` needs besides the state.
    type ConstructorArgs;
    /// Why a state cannot be restored; it should name the offending field and value.
    type Error;

    /// Copies out this object's state.
    fn save(&self) -> Self::State;

    /// Builds an object from `args` and a saved `state`, checking that they agree.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// A toy device: a counter and a register bank whose size comes from the VMM.
    #[derive(Debug, PartialEq)]
    struct Counter {
        regs: Vec<u32>,
        count: u64,
    }

    #[derive(Serialize, Deserialize)]
    struct CounterState {
        regs: Vec<u32>,
        count: u64,
    }

    impl Persist for Counter {
        type State = CounterState;
        type ConstructorArgs = usize;
        type Error = String;

        fn save(&self) -> CounterState {
            CounterState {
                regs: self.regs.clone(),
                count: self.count,
            }
        }

        fn restore(nregs: usize, state: &CounterState) -> Result<Self, String> {
            if state.regs.len() != nregs {
                return Err(format!(
                    "saved {} registers; the device has {nregs}",
                    state.regs.len()
                ));
            }
            Ok(Counter {
                regs: state.regs.clone(),
                count: state.count,
            })
        }
    }

    #[test]
    fn save_and_restore_through_a_state_file() {
        let dev = Counter {
            regs: vec![1, 2, 3],
            count: 42,
        };
        let bytes = crate::to_bytes(&dev.save()).unwrap();
        let state: CounterState = crate::from_bytes(&bytes).unwrap();
        assert_eq!(Counter::restore(3, &state).unwrap(), dev);
        assert!(Counter::restore(4, &state).is_err());
    }
}
