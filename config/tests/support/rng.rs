//! xorshift64*: enough randomness for the fuzz runs, no dependency, a fixed seed so a
//! finding reproduces. Shared by the config and protocol fuzz runs.

pub struct Rng(pub u64);

#[allow(dead_code)] // each fuzz run uses what it needs
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
}
