//! The persistent map inside a snapshot: routes by key, in a hash array mapped trie whose nodes
//! hold exactly the slots they use.
//!
//! A write copies only the nodes on its key's path (O(log n)); every other node is shared with the
//! snapshot it was cloned from. imbl's `HashMap` works the same way but gives every node room for
//! all 32 children: at 100 000 routes most nodes hold two to four, and its map cost ~340 bytes a
//! route against ~40 here (`examples/routemem.rs` measures both). A node is an `Arc<[Slot]>` with
//! its bitmap kept in the slot that points to it, and a route is its own key, so nothing but the
//! trie itself is stored.

use std::hash::BuildHasher;
use std::sync::Arc;

use super::Route;

/// Hash bits consumed per level: 32-way nodes.
const BITS: u32 = 5;
const MASK: u64 = (1 << BITS) - 1;
const WIDTH: usize = 1 << BITS;

/// A packed node that grows to this many slots is spread out to all 32 positions...
const SPREAD_FROM: usize = 16;
/// ...and packed again when it falls below this many. The root is always spread out: every
/// lookup starts there.
const PACK_BELOW: usize = 8;

#[derive(Clone)]
enum Slot {
    /// An unused position of a spread-out node.
    Empty,
    /// One route and its key's hash.
    Leaf(u64, Arc<Route>),
    /// A child node: which of its 32 positions are used, and their slots. A node has either one
    /// slot per used position, in position order (packed), or 32 slots, one per position
    /// (spread out: found without counting bits, for the crowded nodes near the root).
    Branch(u32, Arc<[Slot]>),
    /// Routes whose keys have the same 64-bit hash (there are no bits left to tell them apart).
    Collision(Arc<Collided>),
}

#[derive(Clone)]
struct Collided {
    hash: u64,
    routes: Vec<Arc<Route>>,
}

/// Routes by key. Cloning it is one reference count.
#[derive(Clone)]
pub(super) struct RouteMap {
    bitmap: u32,
    root: Arc<[Slot]>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl Default for RouteMap {
    fn default() -> Self {
        RouteMap {
            bitmap: 0,
            root: (0..WIDTH).map(|_| Slot::Empty).collect(),
            len: 0,
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl std::fmt::Debug for RouteMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMap").field("len", &self.len).finish()
    }
}

/// Where `hash` goes in a node at `shift`: its bit in the bitmap, and the index of its slot
/// (without counting bits in a spread-out node; the target has no `popcnt` instruction).
#[inline]
fn place(bitmap: u32, slots: &[Slot], hash: u64, shift: u32) -> (u32, usize) {
    let position = ((hash >> shift) & MASK) as u32;
    let bit = 1u32 << position;
    let index = if slots.len() == WIDTH {
        position as usize
    } else {
        (bitmap & (bit - 1)).count_ones() as usize
    };
    (bit, index)
}

impl RouteMap {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(super) fn get(&self, key: &str) -> Option<&Arc<Route>> {
        let hash = self.hasher.hash_one(key);
        let (mut bitmap, mut slots) = (self.bitmap, &*self.root);
        let mut shift = 0;
        loop {
            let (bit, index) = place(bitmap, slots, hash, shift);
            if bitmap & bit == 0 {
                return None;
            }
            match slots.get(index)? {
                Slot::Leaf(h, route) => {
                    return (*h == hash && route.key() == key).then_some(route);
                }
                Slot::Branch(b, s) => {
                    bitmap = *b;
                    slots = s;
                    shift += BITS;
                }
                Slot::Collision(c) if c.hash == hash => {
                    return c.routes.iter().find(|r| r.key() == key);
                }
                Slot::Collision(_) | Slot::Empty => return None,
            }
        }
    }

    /// Puts `route` at its key; returns the route it replaced.
    pub(super) fn insert(&mut self, route: Arc<Route>) -> Option<Arc<Route>> {
        let hash = self.hasher.hash_one(route.key());
        let old = insert(&mut self.bitmap, &mut self.root, 0, hash, route);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes the route at `key`; returns it.
    pub(super) fn remove(&mut self, key: &str) -> Option<Arc<Route>> {
        // Checked first, so that removing an absent key copies no node.
        self.get(key)?;
        let hash = self.hasher.hash_one(key);
        let old = remove(&mut self.bitmap, &mut self.root, 0, hash, key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Every route, in no particular order.
    pub(super) fn values(&self) -> Values<'_> {
        Values {
            stack: vec![self.root.iter()],
            collision: [].iter(),
        }
    }
}

fn insert(
    bitmap: &mut u32,
    slots: &mut Arc<[Slot]>,
    shift: u32,
    hash: u64,
    route: Arc<Route>,
) -> Option<Arc<Route>> {
    let (bit, index) = place(*bitmap, slots, hash, shift);
    if *bitmap & bit == 0 {
        *bitmap |= bit;
        if slots.len() == WIDTH {
            Arc::make_mut(slots)[index] = Slot::Leaf(hash, route);
        } else {
            let mut grown = Vec::with_capacity(slots.len() + 1);
            grown.extend_from_slice(&slots[..index]);
            grown.push(Slot::Leaf(hash, route));
            grown.extend_from_slice(&slots[index..]);
            *slots = if grown.len() >= SPREAD_FROM {
                spread(*bitmap, grown)
            } else {
                grown.into()
            };
        }
        return None;
    }
    let slot = &mut Arc::make_mut(slots)[index];
    match slot {
        Slot::Leaf(h, existing) if *h == hash => {
            if existing.key() == route.key() {
                return Some(std::mem::replace(existing, route));
            }
            *slot = Slot::Collision(Arc::new(Collided {
                hash,
                routes: vec![existing.clone(), route],
            }));
            None
        }
        Slot::Leaf(h, existing) => {
            let old = Slot::Leaf(*h, existing.clone());
            *slot = split(shift + BITS, *h, old, hash, Slot::Leaf(hash, route));
            None
        }
        Slot::Branch(b, s) => insert(b, s, shift + BITS, hash, route),
        Slot::Collision(c) if c.hash == hash => {
            let c = Arc::make_mut(c);
            match c.routes.iter_mut().find(|r| r.key() == route.key()) {
                Some(same) => Some(std::mem::replace(same, route)),
                None => {
                    c.routes.push(route);
                    None
                }
            }
        }
        Slot::Collision(c) => {
            let (h, old) = (c.hash, Slot::Collision(c.clone()));
            *slot = split(shift + BITS, h, old, hash, Slot::Leaf(hash, route));
            None
        }
        Slot::Empty => {
            *slot = Slot::Leaf(hash, route);
            None
        }
    }
}

/// A node at `shift` holding two slots whose hashes differ (deeper nodes while their positions
/// agree).
fn split(shift: u32, h1: u64, s1: Slot, h2: u64, s2: Slot) -> Slot {
    let (i1, i2) = ((h1 >> shift) & MASK, (h2 >> shift) & MASK);
    if i1 == i2 {
        return Slot::Branch(1 << i1, Arc::from([split(shift + BITS, h1, s1, h2, s2)]));
    }
    let pair = if i1 < i2 { [s1, s2] } else { [s2, s1] };
    Slot::Branch((1 << i1) | (1 << i2), Arc::from(pair))
}

/// The packed slots of `bitmap`, one per position.
fn spread(bitmap: u32, packed: Vec<Slot>) -> Arc<[Slot]> {
    let mut packed = packed.into_iter();
    (0..WIDTH)
        .map(|position| match bitmap & (1 << position) {
            0 => Slot::Empty,
            _ => packed.next().unwrap_or(Slot::Empty),
        })
        .collect()
}

fn remove(
    bitmap: &mut u32,
    slots: &mut Arc<[Slot]>,
    shift: u32,
    hash: u64,
    key: &str,
) -> Option<Arc<Route>> {
    let (bit, index) = place(*bitmap, slots, hash, shift);
    if *bitmap & bit == 0 {
        return None;
    }
    let removed = match &mut Arc::make_mut(slots)[index] {
        Slot::Leaf(h, route) if *h == hash && route.key() == key => route.clone(),
        Slot::Leaf(..) | Slot::Empty => return None,
        Slot::Branch(b, s) => {
            let removed = remove(b, s, shift + BITS, hash, key)?;
            // A child left with one route (or one collision) is folded into this node, so the
            // trie stays as shallow as its keys need.
            let fold = match &**s {
                [] => None,
                [Slot::Branch(..)] => return Some(removed),
                [only] => Some(only.clone()),
                _ => return Some(removed),
            };
            match fold {
                Some(only) => {
                    Arc::make_mut(slots)[index] = only;
                    return Some(removed);
                }
                None => removed,
            }
        }
        slot @ Slot::Collision(_) => {
            let Slot::Collision(c) = slot else {
                return None;
            };
            if c.hash != hash {
                return None;
            }
            let at = c.routes.iter().position(|r| r.key() == key)?;
            let removed = Arc::make_mut(c).routes.remove(at);
            if let [only] = &c.routes[..] {
                *slot = Slot::Leaf(hash, only.clone());
            }
            return Some(removed);
        }
    };
    // The slot at `index` goes: its route was removed, or its child node is empty.
    *bitmap &= !bit;
    if slots.len() == WIDTH {
        Arc::make_mut(slots)[index] = Slot::Empty;
        if shift > 0 && (bitmap.count_ones() as usize) < PACK_BELOW {
            *slots = slots
                .iter()
                .filter(|s| !matches!(s, Slot::Empty))
                .cloned()
                .collect();
        }
    } else {
        *slots = slots
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, s)| s.clone())
            .collect();
    }
    Some(removed)
}

/// Iterator over a map's routes, depth first.
pub(super) struct Values<'a> {
    stack: Vec<std::slice::Iter<'a, Slot>>,
    collision: std::slice::Iter<'a, Arc<Route>>,
}

impl<'a> Iterator for Values<'a> {
    type Item = &'a Arc<Route>;

    fn next(&mut self) -> Option<&'a Arc<Route>> {
        loop {
            if let Some(route) = self.collision.next() {
                return Some(route);
            }
            let top = self.stack.last_mut()?;
            match top.next() {
                None => {
                    self.stack.pop();
                }
                Some(Slot::Leaf(_, route)) => return Some(route),
                Some(Slot::Branch(_, slots)) => self.stack.push(slots.iter()),
                Some(Slot::Collision(c)) => self.collision = c.routes.iter(),
                Some(Slot::Empty) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::RouteData;
    use crate::target::Target;

    fn route(key: &str) -> Arc<Route> {
        let mut data = RouteData::new();
        data.insert("target".into(), "http://t/".into());
        Arc::new(Route::new(
            key.into(),
            Target::parse("http://t/").unwrap(),
            data,
            false,
        ))
    }

    #[test]
    fn inserts_replaces_and_removes_like_a_hash_map() {
        let mut map = RouteMap::default();
        let mut model = std::collections::HashMap::new();
        for round in 0..3 {
            for i in 0..3000 {
                let key = format!("/k{}", (i * 7 + round) % 2000);
                let r = route(&key);
                let old = map.insert(r.clone());
                assert_eq!(
                    old.map(|o| o.key().to_owned()),
                    model.insert(key.clone(), r).map(|o| o.key().to_owned())
                );
            }
            for i in (0..2000).step_by(3 + round) {
                let key = format!("/k{i}");
                assert_eq!(map.remove(&key).is_some(), model.remove(&key).is_some());
            }
            assert_eq!(map.len(), model.len());
            assert_eq!(map.values().count(), model.len());
            for i in 0..2100 {
                let key = format!("/k{i}");
                assert_eq!(
                    map.get(&key).map(Arc::as_ptr),
                    model.get(&key).map(Arc::as_ptr),
                    "{key}"
                );
            }
        }
    }

    #[test]
    fn nodes_spread_out_and_pack_again_as_the_map_grows_and_empties() {
        assert_eq!(std::mem::size_of::<Slot>(), 24);
        let mut map = RouteMap::default();
        let keys: Vec<String> = (0..5000).map(|i| format!("/user/u{i}")).collect();
        for key in &keys {
            map.insert(route(key));
        }
        assert!(map.root.iter().all(|s| matches!(s, Slot::Branch(..))));
        for (n, key) in keys.iter().enumerate() {
            assert!(map.remove(key).is_some(), "{key}");
            if n % 500 == 0 {
                assert!(keys[n + 1..].iter().all(|k| map.get(k).is_some()));
                assert!(keys[..=n].iter().all(|k| map.get(k).is_none()));
            }
        }
        assert_eq!((map.len(), map.bitmap), (0, 0));
        assert!(map.root.iter().all(|s| matches!(s, Slot::Empty)));
    }

    #[test]
    fn clones_are_unchanged_by_later_writes() {
        let mut map = RouteMap::default();
        for i in 0..500 {
            map.insert(route(&format!("/k{i}")));
        }
        let before = map.clone();
        for i in 0..250 {
            map.remove(&format!("/k{i}"));
        }
        map.insert(route("/new"));
        assert_eq!(before.len(), 500);
        assert!(before.get("/k1").is_some() && before.get("/new").is_none());
        assert!(map.get("/k1").is_none() && map.get("/new").is_some());
        assert_eq!(map.len(), 251);
    }

    #[test]
    fn full_hash_collisions_are_kept_apart() {
        // Slots built by hand with one hash for three keys, as if the hasher collided.
        let (a, b, c) = (route("/a"), route("/b"), route("/c"));
        let mut bitmap = 0;
        let mut slots: Arc<[Slot]> = Arc::new([]);
        for r in [&a, &b, &c] {
            assert!(insert(&mut bitmap, &mut slots, 0, 42, r.clone()).is_none());
        }
        assert!(matches!(&slots[..], [Slot::Collision(c)] if c.hash == 42 && c.routes.len() == 3));
        let replaced = insert(&mut bitmap, &mut slots, 0, 42, route("/b"));
        assert!(replaced.is_some_and(|r| Arc::ptr_eq(&r, &b)));
        // A different hash in the same position splits the collision off into a node.
        assert!(insert(&mut bitmap, &mut slots, 0, 42 + 32 * 5, route("/d")).is_none());
        assert!(remove(&mut bitmap, &mut slots, 0, 42 + 32 * 5, "/d").is_some());
        assert!(remove(&mut bitmap, &mut slots, 0, 42, "/a").is_some());
        assert!(remove(&mut bitmap, &mut slots, 0, 42, "/a").is_none());
        assert!(remove(&mut bitmap, &mut slots, 0, 42, "/c").is_some());
        assert!(matches!(&slots[..], [Slot::Leaf(42, r)] if r.key() == "/b"));
        assert!(remove(&mut bitmap, &mut slots, 0, 42, "/b").is_some());
        assert_eq!((bitmap, slots.len()), (0, 0));
    }
}
