//! A compact compiler for seccompiler's JSON policy format, and an interpreter of the classic
//! BPF it (and seccompiler) emits.
//!
//! seccompiler turns a filter into a linear chain, about five instructions per syscall, so a call
//! walks hundreds of instructions and the kernel checks, converts and JIT-compiles all of them at
//! every install. [`Filter::compile`] emits the same arch prologue (a foreign `AUDIT_ARCH` kills the
//! process), loads `nr`, then a binary search (`jge`, unsigned) over the intervals of
//! `[0, 2^32)` where the action is constant: adjacent syscalls with the same action are one
//! interval, and each syscall with argument conditions is its own leaf holding its rules (rules
//! OR'ed, the conditions of a rule AND'ed; a match returns the filter action, none the default).
//! Conditions mean exactly what seccompiler makes of them: `dword` compares the low 32 bits of
//! the argument with the low 32 bits of the value (and mask), `qword` all 64 bits, unsigned; a
//! syscall listed both with and without conditions keeps only its conditional rules.
//!
//! Syscall numbers come from the caller (`build.rs` asks seccompiler's own table), so they
//! cannot drift from the reference compiler; anything this module does not understand is an
//! [`Error`], and the caller falls back to seccompiler's program.
//!
//! `build.rs` includes this file with `#[path]`: std and `serde_json` only, no crate imports.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde_json::{Map, Value};

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Insn {
    pub(crate) code: u16,
    pub(crate) jt: u8,
    pub(crate) jf: u8,
    pub(crate) k: u32,
}

/// The architectures whose `seccomp_data` layout (little-endian) this compiler knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// From a `target_arch` name (`CARGO_CFG_TARGET_ARCH`, `std::env::consts::ARCH`).
    pub(crate) fn from_target(arch: &str) -> Option<Self> {
        match arch {
            "x86_64" => Some(Self::X86_64),
            "aarch64" => Some(Self::Aarch64),
            _ => None,
        }
    }

    /// `AUDIT_ARCH_*` (linux/audit.h): the machine, 64-bit, little-endian.
    pub(crate) fn audit(self) -> u32 {
        const AUDIT_64BIT_LE: u32 = 0x8000_0000 | 0x4000_0000;
        match self {
            Self::X86_64 => 62 | AUDIT_64BIT_LE,
            Self::Aarch64 => 183 | AUDIT_64BIT_LE,
        }
    }
}

/// Why a filter was not compiled; the caller then uses seccompiler's program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Error {
    /// The JSON holds something this compiler does not understand (seccompiler may).
    Unsupported(String),
    /// The policy has no filter of that name.
    NoFilter(String),
    /// The syscall table does not know this name.
    UnknownSyscall(String),
    /// The program would exceed what seccompiler accepts (`BPF_MAXINSNS`).
    TooLarge(usize),
    /// A bug of this compiler, caught before it emitted a wrong program.
    Internal(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported(what) => write!(f, "unsupported policy: {what}"),
            Self::NoFilter(name) => write!(f, "the policy has no filter {name:?}"),
            Self::UnknownSyscall(name) => write!(f, "unknown syscall {name:?}"),
            Self::TooLarge(len) => write!(f, "{len} instructions, more than a filter may hold"),
            Self::Internal(what) => write!(f, "internal error: {what}"),
        }
    }
}

impl std::error::Error for Error {}

/// A policy with one filter, `probe`, that names only `syscall`: compiled by seccompiler, its
/// program tells that syscall's number ([`probed_nr`]). How `build.rs` (and the tests) map
/// names to numbers with seccompiler's own table, which it does not export.
pub(crate) fn probe_policy(syscall: &str) -> String {
    serde_json::json!({
        "probe": {"default_action": "allow", "filter_action": "trap", "filter": [{"syscall": syscall}]}
    })
    .to_string()
}

/// The syscall number in seccompiler's program for [`probe_policy`]: the `k` of its `nr`
/// comparison (`ld arch; jeq; ret kill; ld nr; jeq NR …`).
pub(crate) fn probed_nr(prog: &[Insn]) -> Option<u32> {
    match prog.get(3..5)? {
        [ld, jeq] if ld.code == LD_W_ABS && ld.k == NR_OFFSET && jeq.code == JEQ_K => Some(jeq.k),
        _ => None,
    }
}

// Classic BPF opcodes (linux/bpf_common.h): the only ones emitted, and interpreted.
/// `BPF_LD | BPF_W | BPF_ABS`
pub(crate) const LD_W_ABS: u16 = 0x20;
/// `BPF_ALU | BPF_AND | BPF_K`
pub(crate) const ALU_AND_K: u16 = 0x54;
/// `BPF_JMP | BPF_JA`
pub(crate) const JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`
pub(crate) const JEQ_K: u16 = 0x15;
/// `BPF_JMP | BPF_JGT | BPF_K`
pub(crate) const JGT_K: u16 = 0x25;
/// `BPF_JMP | BPF_JGE | BPF_K`
pub(crate) const JGE_K: u16 = 0x35;
/// `BPF_JMP | BPF_JSET | BPF_K`
pub(crate) const JSET_K: u16 = 0x45;
/// `BPF_RET | BPF_K`
pub(crate) const RET_K: u16 = 0x06;

// Return values (linux/seccomp.h).
pub(crate) const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_DATA: u32 = 0xffff;

// `struct seccomp_data` offsets.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARGS_OFFSET: u32 = 16;
/// `BPF_MAXINSNS`; seccompiler refuses a program of this length or more.
const MAX_LEN: usize = 4096;
/// The longest forward distance of a conditional jump.
const MAX_JUMP: usize = u8::MAX as usize;

/// How much of an argument a condition compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Width {
    /// The low 32 bits.
    Dword,
    /// All 64 bits.
    Qword,
}

/// A comparison, unsigned: `argument OP value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `argument & mask == value & mask`
    MaskedEq(u64),
}

/// One condition on one argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cond {
    pub(crate) index: u8,
    pub(crate) width: Width,
    pub(crate) op: Op,
    pub(crate) val: u64,
}

/// One filter of a policy, with syscall numbers resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Filter {
    /// Returned for an unlisted syscall, or a listed one none of whose rules match.
    pub(crate) default: u32,
    /// Returned for a listed syscall without rules, or one of whose rules matches.
    pub(crate) matched: u32,
    /// Syscall number → its rules (each a conjunction of conditions); no rule: always matches.
    pub(crate) syscalls: BTreeMap<u32, Vec<Vec<Cond>>>,
}

/// Reads the filter `name` of `json` (seccompiler's format; `syscall_nr` maps a syscall name to
/// its number on the target), as strictly as seccompiler does: an unknown key, action
/// or operator is an error rather than something to ignore.
pub(crate) fn parse(
    json: &str,
    name: &str,
    syscall_nr: &mut dyn FnMut(&str) -> Option<u32>,
) -> Result<Filter, Error> {
    let root: Value = serde_json::from_str(json).map_err(|e| unsupported(format!("JSON: {e}")))?;
    let filters = root
        .as_object()
        .ok_or_else(|| unsupported("the policy is not an object"))?;
    let filter = filters
        .get(name)
        .ok_or_else(|| Error::NoFilter(name.to_owned()))?;
    let filter = object(
        filter,
        "a filter",
        &[
            "default_action",
            "mismatch_action",
            "filter_action",
            "match_action",
            "filter",
        ],
    )?;
    let default = action(aliased(filter, "default_action", "mismatch_action")?)?;
    let matched = action(aliased(filter, "filter_action", "match_action")?)?;
    if default == matched {
        return Err(unsupported("identical default and filter actions"));
    }
    let rules = filter
        .get("filter")
        .and_then(Value::as_array)
        .ok_or_else(|| unsupported("a filter needs a \"filter\" array"))?;
    let mut syscalls: BTreeMap<u32, Vec<Vec<Cond>>> = BTreeMap::new();
    for rule in rules {
        let rule = object(rule, "a rule", &["syscall", "args", "comment"])?;
        let name = rule
            .get("syscall")
            .and_then(Value::as_str)
            .ok_or_else(|| unsupported("a rule needs a \"syscall\" string"))?;
        let nr = syscall_nr(name).ok_or_else(|| Error::UnknownSyscall(name.to_owned()))?;
        // As seccompiler: a rule without conditions only makes sure the syscall is listed.
        let conditions = syscalls.entry(nr).or_default();
        match rule.get("args") {
            None | Some(Value::Null) => {}
            Some(Value::Array(args)) if !args.is_empty() => {
                conditions.push(args.iter().map(condition).collect::<Result<_, _>>()?);
            }
            Some(_) => return Err(unsupported("\"args\" must be a non-empty array")),
        }
    }
    Ok(Filter {
        default,
        matched,
        syscalls,
    })
}

fn unsupported(what: impl Into<String>) -> Error {
    Error::Unsupported(what.into())
}

/// `v` as an object whose keys are all in `keys` (a `comment` must be a string).
fn object<'a>(v: &'a Value, what: &str, keys: &[&str]) -> Result<&'a Map<String, Value>, Error> {
    let map = v
        .as_object()
        .ok_or_else(|| unsupported(format!("{what} must be an object")))?;
    if let Some(key) = map.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(unsupported(format!("unknown key {key:?} in {what}")));
    }
    if map.get("comment").is_some_and(|c| !c.is_string()) {
        return Err(unsupported(format!("a comment in {what} must be a string")));
    }
    Ok(map)
}

/// The value of `key` or of its alias `alias` (seccompiler's serde aliases), exactly one.
fn aliased<'a>(map: &'a Map<String, Value>, key: &str, alias: &str) -> Result<&'a Value, Error> {
    match (map.get(key), map.get(alias)) {
        (Some(v), None) | (None, Some(v)) => Ok(v),
        _ => Err(unsupported(format!(
            "a filter needs exactly one of {key}, {alias}"
        ))),
    }
}

fn action(v: &Value) -> Result<u32, Error> {
    match v {
        Value::String(s) => match s.as_str() {
            "allow" => Ok(RET_ALLOW),
            "kill_thread" => Ok(RET_KILL_THREAD),
            "kill_process" => Ok(RET_KILL_PROCESS),
            "log" => Ok(RET_LOG),
            "trap" => Ok(RET_TRAP),
            _ => Err(unsupported(format!("action {s:?}"))),
        },
        Value::Object(map) if map.len() == 1 => {
            let (kind, data) = map.iter().next().ok_or_else(|| unsupported("action"))?;
            let data = data
                .as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .ok_or_else(|| unsupported(format!("the data of action {kind:?}")))?;
            match kind.as_str() {
                "errno" => Ok(RET_ERRNO | (data & RET_DATA)),
                "trace" => Ok(RET_TRACE | (data & RET_DATA)),
                _ => Err(unsupported(format!("action {kind:?}"))),
            }
        }
        _ => Err(unsupported(format!("action {v}"))),
    }
}

fn condition(v: &Value) -> Result<Cond, Error> {
    let c = object(v, "a condition", &["index", "type", "op", "val", "comment"])?;
    let index = c
        .get("index")
        .and_then(Value::as_u64)
        .and_then(|i| u8::try_from(i).ok())
        .filter(|&i| i <= 5)
        .ok_or_else(|| unsupported("a condition's \"index\" must be 0 to 5"))?;
    let width = match c.get("type").and_then(Value::as_str) {
        Some("dword") => Width::Dword,
        Some("qword") => Width::Qword,
        _ => return Err(unsupported("a condition's \"type\" must be dword or qword")),
    };
    let op = match c.get("op") {
        Some(Value::String(op)) => match op.as_str() {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "lt" => Op::Lt,
            "le" => Op::Le,
            "gt" => Op::Gt,
            "ge" => Op::Ge,
            _ => return Err(unsupported(format!("operator {op:?}"))),
        },
        Some(Value::Object(op)) if op.len() == 1 => match op.get("masked_eq").map(Value::as_u64) {
            Some(Some(mask)) => Op::MaskedEq(mask),
            _ => {
                return Err(unsupported(
                    "an operator object must be {\"masked_eq\": mask}",
                ));
            }
        },
        _ => return Err(unsupported("a condition needs an \"op\"")),
    };
    let val = c
        .get("val")
        .and_then(Value::as_u64)
        .ok_or_else(|| unsupported("a condition's \"val\" must be an unsigned 64-bit integer"))?;
    Ok(Cond {
        index,
        width,
        op,
        val,
    })
}

impl Filter {
    /// The compact program for `arch`.
    pub(crate) fn compile(&self, arch: Arch) -> Result<Vec<Insn>, Error> {
        // Conditions that always hold (a zero mask) are dropped; a rule left without any always
        // matches, and so does its syscall.
        let mut syscalls: BTreeMap<u32, Option<Vec<Vec<Cond>>>> = BTreeMap::new();
        for (&nr, rules) in &self.syscalls {
            let rules: Vec<Vec<Cond>> = rules
                .iter()
                .map(|r| r.iter().copied().filter(|c| !always_true(c)).collect())
                .collect();
            let always = rules.is_empty() || rules.iter().any(Vec::is_empty);
            syscalls.insert(nr, if always { None } else { Some(rules) });
        }

        // The intervals of [0, 2^32) with one leaf each, merging equal neighbours.
        let mut segments: Vec<Segment<'_>> = Vec::new();
        let mut next = 0u64;
        for (&nr, rules) in &syscalls {
            if u64::from(nr) > next {
                Segment::push(&mut segments, to_u32(next)?, Leaf::Ret(self.default));
            }
            let leaf = match rules {
                None => Leaf::Ret(self.matched),
                Some(rules) => Leaf::Rules(rules),
            };
            Segment::push(&mut segments, nr, leaf);
            next = u64::from(nr) + 1;
        }
        if next <= u64::from(u32::MAX) {
            Segment::push(&mut segments, to_u32(next)?, Leaf::Ret(self.default));
        }

        // Built back to front, so every jump's target is already placed.
        let mut g = Gen::default();
        let body = match segments.as_slice() {
            // One action for every syscall (an empty filter): no need for the number.
            [
                Segment {
                    leaf: Leaf::Ret(k), ..
                },
            ] => g.push(ret(*k)),
            _ => {
                let search = g.search(&segments, self)?;
                match g.stmt(LD_W_ABS, NR_OFFSET, search)? {
                    Target::At(at) => at,
                    Target::Ret(_) => return Err(Error::Internal("a load that returns".into())),
                }
            }
        };
        // seccompiler's prologue: ld arch; jeq AUDIT_ARCH, 1, 0; ret KILL_PROCESS.
        let kill = Target::At(g.push(ret(RET_KILL_PROCESS)));
        let arch_ok = g.jump(JEQ_K, arch.audit(), Target::At(body), kill)?;
        g.stmt(LD_W_ABS, ARCH_OFFSET, arch_ok)?;

        let prog: Vec<Insn> = g.rev.into_iter().rev().collect();
        if prog.len() >= MAX_LEN {
            return Err(Error::TooLarge(prog.len()));
        }
        check(&prog).map_err(Error::Internal)?;
        Ok(prog)
    }

    /// Argument vectors for a quick comparison of two programs: every value a condition
    /// compares with (±1, and every mask and its complement) in all six arguments, and for each
    /// rule a vector meeting each of its conditions taken alone, then that vector with one
    /// constrained argument changed to each of those values.
    pub(crate) fn probes(&self) -> Vec<[u64; 6]> {
        let mut values = Vec::new();
        for c in self.syscalls.values().flatten().flatten() {
            values.extend([c.val, c.val.wrapping_add(1), c.val.wrapping_sub(1)]);
            if let Op::MaskedEq(m) = c.op {
                values.extend([m, !m, c.val & m, (c.val & m) | !m]);
            }
        }
        values.sort_unstable();
        values.dedup();
        let mut probes: Vec<[u64; 6]> = values.iter().map(|&v| [v; 6]).collect();
        for rule in self.syscalls.values().flatten() {
            let mut anchor = [0u64; 6];
            for c in rule {
                anchor[usize::from(c.index)] = match c.op {
                    Op::Gt | Op::Ne => c.val.wrapping_add(1),
                    Op::Lt => c.val.wrapping_sub(1),
                    _ => c.val,
                };
            }
            probes.push(anchor);
            for c in rule {
                for &v in &values {
                    let mut probe = anchor;
                    probe[usize::from(c.index)] = v;
                    probes.push(probe);
                }
            }
        }
        probes
    }
}

fn to_u32(v: u64) -> Result<u32, Error> {
    u32::try_from(v).map_err(|_| Error::Internal(format!("{v} is not a 32-bit value")))
}

/// `argument & 0 == value & 0`: nothing to check.
fn always_true(c: &Cond) -> bool {
    match (c.op, c.width) {
        (Op::MaskedEq(m), Width::Dword) => m as u32 == 0,
        (Op::MaskedEq(m), Width::Qword) => m == 0,
        _ => false,
    }
}

/// A leaf of the binary search.
enum Leaf<'a> {
    /// Return this action.
    Ret(u32),
    /// Evaluate these rules (a single syscall).
    Rules(&'a [Vec<Cond>]),
}

/// `[start, next segment's start)` → `leaf`.
struct Segment<'a> {
    start: u32,
    leaf: Leaf<'a>,
}

impl<'a> Segment<'a> {
    /// Appends `[start, …)` → `leaf` to `segments`, or extends the last one if it returns the
    /// same action.
    fn push(segments: &mut Vec<Self>, start: u32, leaf: Leaf<'a>) {
        if let (
            Leaf::Ret(k),
            Some(Segment {
                leaf: Leaf::Ret(last),
                ..
            }),
        ) = (&leaf, segments.last())
            && k == last
        {
            return;
        }
        segments.push(Segment { start, leaf });
    }
}

/// Where a jump goes: an instruction already placed (its index from the end), or "an
/// instruction returning k", placed (or shared) when the jump is emitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    At(usize),
    Ret(u32),
}

/// The program under construction, back to front: `rev[0]` is its last instruction, and an
/// instruction's index never changes as more are placed in front of it.
#[derive(Default)]
struct Gen {
    rev: Vec<Insn>,
    /// `ret k` → the index of the nearest (last placed) instruction returning k.
    rets: HashMap<u32, usize>,
}

fn ret(k: u32) -> Insn {
    Insn {
        code: RET_K,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The state of the accumulator: the `seccomp_data` word (by offset) it holds unchanged, or
/// `None` when unknown or masked.
type Acc = Option<u32>;

impl Gen {
    /// The index the next instruction placed will have.
    fn here(&self) -> usize {
        self.rev.len()
    }

    fn push(&mut self, insn: Insn) -> usize {
        let at = self.rev.len();
        if insn.code == RET_K {
            self.rets.insert(insn.k, at);
        }
        self.rev.push(insn);
        at
    }

    /// The index of an instruction a jump placed after at most `slack` more instructions can
    /// reach for `t`: `t` itself if near enough, else a new `ret k`, or a `ja` trampoline (32-bit
    /// offset) to it.
    fn reach(&mut self, t: Target, slack: usize) -> Result<usize, Error> {
        let jump_at = self.here() + slack;
        let near = |at: usize| at + MAX_JUMP + 1 >= jump_at;
        match t {
            Target::Ret(k) => match self.rets.get(&k) {
                Some(&at) if near(at) => Ok(at),
                _ => Ok(self.push(ret(k))),
            },
            Target::At(at) if near(at) => Ok(at),
            Target::At(at) => {
                let k = distance(self.here(), at)?;
                Ok(self.push(Insn {
                    code: JA,
                    jt: 0,
                    jf: 0,
                    k,
                }))
            }
        }
    }

    /// Places a non-jump instruction, followed by `next`.
    fn stmt(&mut self, code: u16, k: u32, next: Target) -> Result<Target, Error> {
        match next {
            Target::At(at) if at + 1 == self.here() => {}
            Target::Ret(k) => {
                self.push(ret(k));
            }
            Target::At(at) => {
                let k = distance(self.here(), at)?;
                self.push(Insn {
                    code: JA,
                    jt: 0,
                    jf: 0,
                    k,
                });
            }
        }
        Ok(Target::At(self.push(Insn {
            code,
            jt: 0,
            jf: 0,
            k,
        })))
    }

    /// Places a conditional jump.
    fn jump(&mut self, code: u16, k: u32, jt: Target, jf: Target) -> Result<Target, Error> {
        // Reaching `jt` may leave one instruction (for `jf`) between it and the jump.
        let t = self.reach(jt, 1)?;
        let f = self.reach(jf, 0)?;
        let at = self.here();
        let offset = |to: usize| {
            let d = distance(at, to)?;
            u8::try_from(d).map_err(|_| Error::Internal(format!("a jump of {d} instructions")))
        };
        let (jt, jf) = (offset(t)?, offset(f)?);
        Ok(Target::At(self.push(Insn { code, jt, jf, k })))
    }

    /// The binary search over `segs` (the accumulator holds `nr`).
    fn search(&mut self, segs: &[Segment<'_>], f: &Filter) -> Result<Target, Error> {
        match segs {
            [] => Err(Error::Internal("no segment".into())),
            [one] => match one.leaf {
                Leaf::Ret(k) => Ok(Target::Ret(k)),
                Leaf::Rules(rules) => self.rules(rules, f.matched, f.default),
            },
            _ => {
                let mid = segs.len() / 2;
                let above = self.search(&segs[mid..], f)?;
                let below = self.search(&segs[..mid], f)?;
                self.jump(JGE_K, segs[mid].start, above, below)
            }
        }
    }

    /// One syscall's rules: the first that matches returns `matched`, else `default`.
    fn rules(&mut self, rules: &[Vec<Cond>], matched: u32, default: u32) -> Result<Target, Error> {
        // What the accumulator holds when each condition starts, so a condition does not load
        // the word its predecessor left there. A rule starts after any failure of the previous.
        let mut starts: Vec<Vec<Acc>> = Vec::with_capacity(rules.len());
        let mut rule_start: Acc = Some(NR_OFFSET);
        for rule in rules {
            let mut acc = rule_start;
            let mut failures = Vec::new();
            let mut starts_of_rule = Vec::with_capacity(rule.len());
            for c in rule {
                starts_of_rule.push(acc);
                let (pass, fail) = exits(c);
                failures.extend(fail);
                acc = join(&pass);
            }
            starts.push(starts_of_rule);
            rule_start = join(&failures);
        }

        let mut next_rule = Target::Ret(default);
        for (rule, starts) in rules.iter().zip(&starts).rev() {
            let mut next = Target::Ret(matched);
            for (c, &acc) in rule.iter().zip(starts).rev() {
                next = self.cond(c, acc, next, next_rule)?;
            }
            next_rule = next;
        }
        Ok(next_rule)
    }

    /// One condition: to `pass` if it holds, else to `fail`; `acc` is what the accumulator
    /// holds at its start. Mirrors seccompiler's `SeccompCondition::into_*_bpf`.
    fn cond(&mut self, c: &Cond, acc: Acc, pass: Target, fail: Target) -> Result<Target, Error> {
        let lo = ARGS_OFFSET + 8 * u32::from(c.index);
        let hi = lo + 4;
        let (vh, vl) = ((c.val >> 32) as u32, c.val as u32);
        let (mh, ml) = match c.op {
            Op::MaskedEq(m) => ((m >> 32) as u32, m as u32),
            _ => (u32::MAX, u32::MAX),
        };
        // The low words' comparison (the whole of a dword condition).
        let low = |g: &mut Self, acc: Acc| match c.op {
            Op::Eq => g.test(lo, acc, u32::MAX, JEQ_K, vl, pass, fail),
            Op::Ne => g.test(lo, acc, u32::MAX, JEQ_K, vl, fail, pass),
            Op::Gt => g.test(lo, acc, u32::MAX, JGT_K, vl, pass, fail),
            Op::Ge => g.test(lo, acc, u32::MAX, JGE_K, vl, pass, fail),
            Op::Le => g.test(lo, acc, u32::MAX, JGT_K, vl, fail, pass),
            Op::Lt => g.test(lo, acc, u32::MAX, JGE_K, vl, fail, pass),
            Op::MaskedEq(_) => g.test(lo, acc, ml, JEQ_K, vl & ml, pass, fail),
        };
        if c.width == Width::Dword || (matches!(c.op, Op::MaskedEq(_)) && mh == 0) {
            return low(self, acc);
        }
        // A qword: the high words decide, or are equal and the low words decide (and load
        // theirs: the accumulator holds the high word, maybe masked).
        let low = low(self, None)?;
        match c.op {
            Op::Eq => self.test(hi, acc, u32::MAX, JEQ_K, vh, low, fail),
            Op::Ne => self.test(hi, acc, u32::MAX, JEQ_K, vh, low, pass),
            Op::MaskedEq(_) => self.test(hi, acc, mh, JEQ_K, vh & mh, low, fail),
            Op::Gt | Op::Ge => {
                let equal = self.jump(JEQ_K, vh, low, fail)?;
                self.test(hi, acc, u32::MAX, JGT_K, vh, pass, equal)
            }
            Op::Lt | Op::Le => {
                let equal = self.jump(JEQ_K, vh, low, pass)?;
                self.test(hi, acc, u32::MAX, JGT_K, vh, fail, equal)
            }
        }
    }

    /// `[ld word] [and mask] jcc k, jt, jf`; the load is left out when the accumulator holds the
    /// word already.
    #[allow(clippy::too_many_arguments)]
    fn test(
        &mut self,
        word: u32,
        acc: Acc,
        mask: u32,
        code: u16,
        k: u32,
        jt: Target,
        jf: Target,
    ) -> Result<Target, Error> {
        let mut entry = self.jump(code, k, jt, jf)?;
        if mask != u32::MAX {
            entry = self.stmt(ALU_AND_K, mask, entry)?;
        }
        if acc != Some(word) {
            entry = self.stmt(LD_W_ABS, word, entry)?;
        }
        Ok(entry)
    }
}

/// The instructions between a jump at index `from` and its target at index `to` (both counted
/// from the end).
fn distance(from: usize, to: usize) -> Result<u32, Error> {
    from.checked_sub(to + 1)
        .and_then(|d| u32::try_from(d).ok())
        .ok_or_else(|| Error::Internal(format!("a jump from {from} to {to}")))
}

/// What the accumulator may hold when [`Gen::cond`] leaves `c` for its pass and fail targets.
fn exits(c: &Cond) -> (Vec<Acc>, Vec<Acc>) {
    let lo = ARGS_OFFSET + 8 * u32::from(c.index);
    let hi = lo + 4;
    let (mh, ml) = match c.op {
        Op::MaskedEq(m) => ((m >> 32) as u32, m as u32),
        _ => (u32::MAX, u32::MAX),
    };
    let low = if ml == u32::MAX { Some(lo) } else { None };
    let high = if mh == u32::MAX { Some(hi) } else { None };
    match (c.width, c.op) {
        (Width::Dword, _) => (vec![low], vec![low]),
        (Width::Qword, Op::MaskedEq(_)) if mh == 0 => (vec![low], vec![low]),
        (Width::Qword, Op::Eq | Op::MaskedEq(_)) => (vec![low], vec![high, low]),
        (Width::Qword, Op::Ne) => (vec![high, low], vec![low]),
        (Width::Qword, Op::Gt | Op::Ge | Op::Lt | Op::Le) => (vec![high, low], vec![high, low]),
    }
}

/// The accumulator after any of `exits`: known only if they all agree.
fn join(exits: &[Acc]) -> Acc {
    match exits.split_first() {
        Some((&first, rest)) if rest.iter().all(|&a| a == first) => first,
        _ => None,
    }
}

/// The kernel's static checks (`bpf_check_classic`, `seccomp_check_filter`) for the opcodes
/// used here: every jump lands inside the program, loads are aligned words of `seccomp_data`,
/// the last instruction returns.
pub(crate) fn check(prog: &[Insn]) -> Result<(), String> {
    if prog.is_empty() || prog.len() > MAX_LEN {
        return Err(format!("a program of {} instructions", prog.len()));
    }
    for (pc, i) in prog.iter().enumerate() {
        let room = prog.len() - pc - 1;
        let ok = match i.code {
            LD_W_ABS => i.k.is_multiple_of(4) && i.k < 64,
            ALU_AND_K | RET_K => true,
            JA => (i.k as usize) < room,
            JEQ_K | JGT_K | JGE_K | JSET_K => usize::from(i.jt.max(i.jf)) < room,
            _ => false,
        };
        if !ok {
            return Err(format!("instruction {pc} {i:?}"));
        }
    }
    match prog.last() {
        Some(i) if i.code == RET_K => Ok(()),
        _ => Err("the last instruction does not return".into()),
    }
}

/// `struct seccomp_data`, as a filter sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SeccompData {
    pub(crate) nr: u32,
    pub(crate) arch: u32,
    pub(crate) ip: u64,
    pub(crate) args: [u64; 6],
}

impl SeccompData {
    /// The 32-bit word at `offset` (little-endian: a 64-bit field's low word first).
    fn word(&self, offset: u32) -> Option<u32> {
        let half = |v: u64, hi: bool| if hi { (v >> 32) as u32 } else { v as u32 };
        match offset {
            _ if !offset.is_multiple_of(4) => None,
            0 => Some(self.nr),
            4 => Some(self.arch),
            8 | 12 => Some(half(self.ip, offset == 12)),
            16..=60 => {
                let arg = self.args[((offset - ARGS_OFFSET) / 8) as usize];
                Some(half(arg, offset % 8 == 4))
            }
            _ => None,
        }
    }
}

/// Runs `prog` on `data` as the kernel would: the action it returns, and the words of
/// `seccomp_data` it loaded (bit `i`: the word at offset `4 * i`). Only the opcodes seccompiler
/// and [`Filter::compile`] emit are known; any other is an error.
pub(crate) fn run_traced(prog: &[Insn], data: &SeccompData) -> Result<(u32, u16), String> {
    let mut a: u32 = 0;
    let mut loaded: u16 = 0;
    let mut pc = 0usize;
    loop {
        let i = prog
            .get(pc)
            .ok_or_else(|| format!("ran off the program at {pc}"))?;
        pc += 1;
        let taken = |cond: bool| usize::from(if cond { i.jt } else { i.jf });
        match i.code {
            LD_W_ABS => {
                a = data
                    .word(i.k)
                    .ok_or_else(|| format!("load of offset {} at {}", i.k, pc - 1))?;
                loaded |= 1 << (i.k / 4);
            }
            ALU_AND_K => a &= i.k,
            JA => pc += i.k as usize,
            JEQ_K => pc += taken(a == i.k),
            JGT_K => pc += taken(a > i.k),
            JGE_K => pc += taken(a >= i.k),
            JSET_K => pc += taken(a & i.k != 0),
            RET_K => return Ok((i.k, loaded)),
            code => return Err(format!("unknown opcode {code:#06x} at {}", pc - 1)),
        }
    }
}

/// A quick comparison of two programs for the same policy on `audit`'s architecture: every
/// `nr` below 1024 and a few above, the right and a wrong architecture, arguments all zero and
/// all ones, and, for every `nr` whose evaluation reads its arguments, each of `probes` (see
/// [`Filter::probes`]). The runtime's unit tests compare far more inputs.
pub(crate) fn same_actions(
    a: &[Insn],
    b: &[Insn],
    audit: u32,
    probes: &[[u64; 6]],
) -> Result<(), String> {
    let nrs = (0..1024).chain([0x4000_0000, 0x4000_0001, 0x7fff_ffff, 0x8000_0000, u32::MAX]);
    for nr in nrs {
        for arch in [audit, 0x4000_0003] {
            let mut reads_args = false;
            let fixed = [[0u64; 6], [u64::MAX; 6]];
            for (i, &args) in fixed.iter().chain(probes).enumerate() {
                if i >= fixed.len() && !reads_args {
                    break;
                }
                let data = SeccompData {
                    nr,
                    arch,
                    ip: 0,
                    args,
                };
                let (x, loaded_a) = run_traced(a, &data)?;
                let (y, loaded_b) = run_traced(b, &data)?;
                if x != y {
                    return Err(format!("{data:x?}: {x:#x} against {y:#x}"));
                }
                reads_args |= (loaded_a | loaded_b) >> (ARGS_OFFSET / 4) != 0;
            }
        }
    }
    Ok(())
}

/// The heavy comparison the unit tests make of two programs for one policy.
#[cfg(test)]
pub(crate) mod testing {
    use serde_json::Value;

    use super::{ARGS_OFFSET, Insn, SeccompData, run_traced};

    /// `AUDIT_ARCH_I386`: the `int 0x80` entry on x86_64.
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;

    /// Per argument index, the values around every value and mask the policy's conditions
    /// compare that argument with (in any filter), read from the JSON directly.
    pub(crate) fn arg_values(json: &str) -> [Vec<u64>; 6] {
        let mut out: [Vec<u64>; 6] = Default::default();
        for (index, val, mask) in conditions(json) {
            let vals = &mut out[index];
            vals.extend([
                val,
                val.wrapping_add(1),
                val.wrapping_sub(1),
                val | 0xffff_ffff_0000_0000,
                val ^ (1 << 32),
                u64::from(val as u32),
                !val,
            ]);
            if let Some(m) = mask {
                vals.extend([
                    m,
                    !m,
                    u64::from(!m as u32),
                    m | (1 << 32),
                    (val & m) | !m,
                    val & m,
                ]);
            }
        }
        for vals in &mut out {
            vals.extend([0, 1, u64::from(u32::MAX), 1 << 32, 1 << 63, u64::MAX]);
            vals.sort_unstable();
            vals.dedup();
        }
        out
    }

    /// `(index, val, mask of masked_eq)` of every condition in the JSON.
    fn conditions(json: &str) -> Vec<(usize, u64, Option<u64>)> {
        let root: Value = serde_json::from_str(json).unwrap();
        let mut out = Vec::new();
        for filter in root.as_object().unwrap().values() {
            for rule in filter["filter"].as_array().unwrap() {
                for c in rule
                    .get("args")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let index = usize::try_from(c["index"].as_u64().unwrap()).unwrap();
                    let mask = c["op"].get("masked_eq").map(|m| m.as_u64().unwrap());
                    out.push((index, c["val"].as_u64().unwrap(), mask));
                }
            }
        }
        out
    }

    /// One argument vector per rule of the JSON that satisfies each of its conditions taken
    /// alone (a base for perturbing one argument at a time).
    fn anchors(json: &str) -> Vec<[u64; 6]> {
        let root: Value = serde_json::from_str(json).unwrap();
        let mut out = Vec::new();
        for filter in root.as_object().unwrap().values() {
            for rule in filter["filter"].as_array().unwrap() {
                let Some(args) = rule.get("args").and_then(Value::as_array) else {
                    continue;
                };
                let mut v = [0u64; 6];
                for c in args {
                    let i = usize::try_from(c["index"].as_u64().unwrap()).unwrap();
                    let val = c["val"].as_u64().unwrap();
                    v[i] = match c["op"].as_str() {
                        Some("gt" | "ne") => val.wrapping_add(1),
                        Some("lt") => val.wrapping_sub(1),
                        _ => val,
                    };
                }
                out.push(v);
            }
        }
        out
    }

    /// A small xorshift generator: reproducible "random" arguments.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// The syscall numbers probed: every one below 1024, x32's, and the extremes.
    pub(crate) fn nrs() -> impl Iterator<Item = u32> {
        (0..1024).chain(
            [0, 1, 2, 16, 41, 56, 435, 511, 512, 1023]
                .map(|n| 0x4000_0000 + n)
                .into_iter()
                .chain([0x7fff_ffff, 0x8000_0000, 0xffff_fffe, u32::MAX]),
        )
    }

    /// Runs `a`, `b` and `reference` (if any) on `data`; panics unless they agree. Returns the
    /// arguments' words read (bit `i`: word `i` of `args`).
    fn agree(
        a: &[Insn],
        b: &[Insn],
        reference: &dyn Fn(&SeccompData) -> Option<u32>,
        data: &SeccompData,
    ) -> u16 {
        let (x, la) = run_traced(a, data).unwrap();
        let (y, lb) = run_traced(b, data).unwrap();
        assert_eq!(x, y, "{data:x?}: {x:#x} against {y:#x}");
        if let Some(z) = reference(data) {
            assert_eq!(x, z, "{data:x?}: {x:#x}, but the reference says {z:#x}");
        }
        (la | lb) >> (ARGS_OFFSET / 4)
    }

    /// Panics unless `a` and `b` (and `reference`, when it answers) return the same action for
    /// every input of the set described in the runtime's `seccomp` tests: each probed `nr`,
    /// `audit` and four wrong architectures, and, where the programs read arguments, the
    /// policy's values in every argument, every combination of the arguments' values (when
    /// at most 250,000), each rule's satisfying vector with one argument changed to each of its
    /// values, and random vectors. Returns the number of inputs compared.
    pub(crate) fn assert_same_actions(
        a: &[Insn],
        b: &[Insn],
        audit: u32,
        json: &str,
        reference: &dyn Fn(&SeccompData) -> Option<u32>,
    ) -> usize {
        let per_index = arg_values(json);
        let mut all: Vec<u64> = per_index.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        let anchors = anchors(json);
        let other_64 = if audit == 0xc000_003e {
            0xc000_00b7
        } else {
            0xc000_003e
        };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut compared = 0;
        for nr in nrs() {
            for arch in [audit, AUDIT_ARCH_I386, other_64, 0, u32::MAX] {
                let data = |args: [u64; 6]| SeccompData {
                    nr,
                    arch,
                    ip: 0x7f12_3456_789a,
                    args,
                };
                let mut read = 0u16;
                for args in [
                    [0; 6],
                    [u64::MAX; 6],
                    [u64::from(u32::MAX); 6],
                    [1 << 32; 6],
                ] {
                    read |= agree(a, b, reference, &data(args));
                    compared += 1;
                }
                if read == 0 {
                    continue;
                }
                for &v in &all {
                    read |= agree(a, b, reference, &data([v; 6]));
                    compared += 1;
                }
                // The arguments either program read (either word), until no new one is.
                let mut done = 0u16;
                while read != done {
                    done = read;
                    let indices: Vec<usize> =
                        (0..6).filter(|i| read & (0b11 << (2 * i)) != 0).collect();
                    let combinations: usize = indices.iter().map(|&i| per_index[i].len()).product();
                    if combinations <= 250_000 {
                        for n in 0..combinations {
                            let mut args = [0u64; 6];
                            let mut rest = n;
                            for &i in &indices {
                                args[i] = per_index[i][rest % per_index[i].len()];
                                rest /= per_index[i].len();
                            }
                            read |= agree(a, b, reference, &data(args));
                        }
                        compared += combinations;
                    }
                    for anchor in &anchors {
                        for &i in &indices {
                            for &v in &per_index[i] {
                                let mut args = *anchor;
                                args[i] = v;
                                read |= agree(a, b, reference, &data(args));
                                compared += 1;
                            }
                        }
                    }
                    for _ in 0..2000 {
                        let mut args = [0u64; 6];
                        for (i, arg) in args.iter_mut().enumerate() {
                            let r = rng.next();
                            *arg = if r % 10 < 7 && !per_index[i].is_empty() {
                                per_index[i][(r >> 8) as usize % per_index[i].len()]
                            } else {
                                rng.next()
                            };
                        }
                        read |= agree(a, b, reference, &data(args));
                        compared += 1;
                    }
                }
            }
        }
        compared
    }
}

#[cfg(test)]
mod tests {
    use seccompiler::TargetArch;

    use super::testing::assert_same_actions;
    use super::*;

    fn run(prog: &[Insn], data: &SeccompData) -> Result<u32, String> {
        run_traced(prog, data).map(|(action, _)| action)
    }

    /// `name`'s number on `arch` from seccompiler's table, as `build.rs` finds it.
    fn syscall_nr(arch: TargetArch, name: &str) -> Option<u32> {
        let prog = seccompiler::compile_from_json(probe_policy(name).as_bytes(), arch)
            .ok()?
            .remove("probe")?;
        probed_nr(&insns(&prog))
    }

    fn insns(prog: &[seccompiler::sock_filter]) -> Vec<Insn> {
        prog.iter()
            .map(|i| Insn {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect()
    }

    fn seccompiler_program(json: &str, name: &str, arch: TargetArch) -> Vec<Insn> {
        insns(&seccompiler::compile_from_json(json.as_bytes(), arch).unwrap()[name])
    }

    const ARCHES: [(Arch, TargetArch); 2] = [
        (Arch::X86_64, TargetArch::x86_64),
        (Arch::Aarch64, TargetArch::aarch64),
    ];

    /// What the filter returns, by its definition rather than by any program.
    fn evaluate(f: &Filter, audit: u32, d: &SeccompData) -> u32 {
        if d.arch != audit {
            return RET_KILL_PROCESS;
        }
        let holds = |c: &Cond| {
            let (arg, val, mask) = match (c.width, c.op) {
                (Width::Dword, Op::MaskedEq(m)) => (
                    d.args[usize::from(c.index)] as u32 as u64,
                    c.val as u32 as u64,
                    m as u32 as u64,
                ),
                (Width::Dword, _) => (
                    d.args[usize::from(c.index)] as u32 as u64,
                    c.val as u32 as u64,
                    u64::MAX,
                ),
                (Width::Qword, Op::MaskedEq(m)) => (d.args[usize::from(c.index)], c.val, m),
                (Width::Qword, _) => (d.args[usize::from(c.index)], c.val, u64::MAX),
            };
            match c.op {
                Op::Eq => arg == val,
                Op::Ne => arg != val,
                Op::Lt => arg < val,
                Op::Le => arg <= val,
                Op::Gt => arg > val,
                Op::Ge => arg >= val,
                Op::MaskedEq(_) => arg & mask == val & mask,
            }
        };
        match f.syscalls.get(&d.nr) {
            None => f.default,
            Some(rules) if rules.is_empty() => f.matched,
            Some(rules) if rules.iter().any(|r| r.iter().all(holds)) => f.matched,
            Some(_) => f.default,
        }
    }

    /// Compiles `json`'s filter `name` both ways for both architectures and compares the
    /// compact program with seccompiler's and with [`evaluate`]; returns the compact programs.
    fn check_policy(json: &str, name: &str) -> Vec<Vec<Insn>> {
        let mut out = Vec::new();
        for (arch, target) in ARCHES {
            let filter = parse(json, name, &mut |s| syscall_nr(target, s)).unwrap();
            let compact = filter.compile(arch).unwrap();
            check(&compact).unwrap();
            let linear = seccompiler_program(json, name, target);
            // The prologue is seccompiler's, instruction for instruction.
            assert_eq!(compact[..4], linear[..4]);
            let reference = |d: &SeccompData| Some(evaluate(&filter, arch.audit(), d));
            let n = assert_same_actions(&compact, &linear, arch.audit(), json, &reference);
            println!(
                "{name} on {arch:?}: {} instructions (seccompiler: {}), {n} inputs compared",
                compact.len(),
                linear.len()
            );
            out.push(compact);
        }
        out
    }

    /// A condition as JSON.
    fn cond(index: u8, width: &str, op: Value, val: u64) -> Value {
        serde_json::json!({"index": index, "type": width, "op": op, "val": val})
    }

    /// Every operator at both widths, alone and combined on one argument (where a condition may
    /// reuse the word its predecessor loaded), with values whose high and low words differ.
    #[test]
    fn every_operator_and_width_means_what_seccompiler_makes_of_it() {
        let names = [
            "read", "write", "close", "fstat", "lseek", "mmap", "mprotect", "munmap", "brk",
            "pread64", "pwrite64", "readv", "writev", "dup", "dup3", "getpid", "socket",
        ];
        let ops = [
            serde_json::json!("eq"),
            serde_json::json!("ne"),
            serde_json::json!("lt"),
            serde_json::json!("le"),
            serde_json::json!("gt"),
            serde_json::json!("ge"),
            serde_json::json!({"masked_eq": 0x0000_000f_0000_00f0u64}),
            serde_json::json!({"masked_eq": 0xffu64}),
            serde_json::json!({"masked_eq": 0xffff_ffff_0000_0000u64}),
        ];
        let mut rules = Vec::new();
        let mut names = names.iter();
        for (i, op) in ops.iter().enumerate() {
            for width in ["dword", "qword"] {
                let name = names.next().unwrap_or(&"getpid");
                let idx = u8::try_from(i % 6).unwrap();
                let val = 0x0000_0003_8000_0010u64 + i as u64;
                rules.push(serde_json::json!({"syscall": name, "args": [cond(idx, width, op.clone(), val)]}));
            }
        }
        // Several conditions on one argument, several rules on one syscall.
        rules.push(serde_json::json!({"syscall": "getpid", "args": [
            cond(1, "dword", serde_json::json!("ne"), 5),
            cond(1, "dword", serde_json::json!("ne"), 7),
            cond(1, "dword", serde_json::json!("lt"), 100),
        ]}));
        rules.push(serde_json::json!({"syscall": "getpid", "args": [
            cond(1, "qword", serde_json::json!("ge"), 0x1_0000_0000),
            cond(1, "qword", serde_json::json!("le"), 0x2_0000_0005),
            cond(1, "dword", serde_json::json!("ne"), 3),
        ]}));
        rules.push(serde_json::json!({"syscall": "getpid", "args": [
            cond(1, "qword", serde_json::json!("eq"), 0x5_0000_0000),
        ]}));
        rules.push(serde_json::json!({"syscall": "getpid", "args": [
            cond(1, "dword", serde_json::json!({"masked_eq": 0xf0}), 0x20),
            cond(1, "dword", serde_json::json!({"masked_eq": 0x0f}), 0x03),
        ]}));
        rules.push(serde_json::json!({"syscall": "getpid", "args": [
            cond(1, "qword", serde_json::json!("gt"), u64::MAX - 3),
        ]}));
        // A mask of zero holds for any argument: this rule, and so getppid, always match.
        rules.push(serde_json::json!({"syscall": "getppid", "args": [
            cond(0, "qword", serde_json::json!({"masked_eq": 0}), 9),
        ]}));
        // Listed without and with conditions: only the condition counts (as in seccompiler).
        rules.push(serde_json::json!({"syscall": "getuid"}));
        rules.push(serde_json::json!({"syscall": "getuid", "args": [
            cond(2, "dword", serde_json::json!("eq"), 1),
        ]}));
        for (default, matched) in [
            (serde_json::json!({"errno": 1}), serde_json::json!("allow")),
            (
                serde_json::json!("allow"),
                serde_json::json!("kill_process"),
            ),
            (serde_json::json!("trap"), serde_json::json!({"trace": 7})),
            (serde_json::json!("log"), serde_json::json!("kill_thread")),
        ] {
            let json = serde_json::json!({
                "f": {"default_action": default, "filter_action": matched, "filter": rules}
            })
            .to_string();
            check_policy(&json, "f");
        }
    }

    /// A policy too large for 8-bit jumps: the search needs `ja` trampolines, and a rule's
    /// far-away action its own `ret`.
    #[test]
    fn far_jumps_go_through_trampolines() {
        let default: serde_json::Value =
            serde_json::from_str(crate::seccomp::DEFAULT_POLICY).unwrap();
        let mut names: Vec<&str> = default["sandbox"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["syscall"].as_str().unwrap())
            .filter(|n| ARCHES.iter().all(|&(_, t)| syscall_nr(t, n).is_some()))
            .collect();
        names.dedup();
        let ops = ["eq", "ne", "lt", "le", "gt", "ge"];
        let mut rules = Vec::new();
        for (n, name) in names.iter().enumerate() {
            if n % 3 == 0 {
                continue; // holes in the allowlist: more intervals
            }
            if n % 29 != 1 {
                rules.push(serde_json::json!({"syscall": name}));
                continue;
            }
            for r in 0..9u64 {
                let args: Vec<Value> = (0..4u8)
                    .map(|i| {
                        let op = ops[(n + usize::from(i) + r as usize) % ops.len()];
                        let val = (r << 33) | (u64::from(i) << 8) | 0x40;
                        let width = if (r + u64::from(i)) % 3 == 0 {
                            "dword"
                        } else {
                            "qword"
                        };
                        cond(
                            i + u8::try_from(r % 2).unwrap(),
                            width,
                            serde_json::json!(op),
                            val,
                        )
                    })
                    .collect();
                rules.push(serde_json::json!({"syscall": name, "args": args}));
            }
        }
        let json = serde_json::json!({
            "big": {"default_action": {"errno": 1}, "filter_action": "allow", "filter": rules}
        })
        .to_string();
        for prog in check_policy(&json, "big") {
            assert!(prog.len() > 2 * MAX_JUMP, "{}", prog.len());
            assert!(prog.iter().any(|i| i.code == JA), "no trampoline");
            let allows = prog
                .iter()
                .filter(|i| i.code == RET_K && i.k == RET_ALLOW)
                .count();
            assert!(allows > 1, "one shared ret allow");
        }
    }

    /// The tiny clone3 filter and an empty one.
    #[test]
    fn small_filters() {
        let default: Value = serde_json::from_str(crate::seccomp::DEFAULT_POLICY).unwrap();
        let enosys = serde_json::json!({"sandbox_enosys": default["sandbox_enosys"]});
        check_policy(&enosys.to_string(), "sandbox_enosys");
        let json =
            r#"{"none": {"default_action": "allow", "filter_action": "trap", "filter": []}}"#;
        for prog in check_policy(json, "none") {
            assert_eq!(prog.len(), 4, "{prog:?}");
        }
    }

    #[test]
    fn what_it_does_not_understand_is_an_error() {
        let nr = &mut |s: &str| syscall_nr(TargetArch::x86_64, s);
        let with = |rule: &str| {
            format!(
                r#"{{"f": {{"default_action": {{"errno": 1}}, "filter_action": "allow", "filter": [{rule}]}}}}"#
            )
        };
        let unsupported = |json: String, nr: &mut dyn FnMut(&str) -> Option<u32>| {
            let err = parse(&json, "f", nr).unwrap_err();
            assert!(matches!(err, Error::Unsupported(_)), "{json}: {err}");
        };
        unsupported(with(r#"{"syscall": "read", "action": "allow"}"#), nr);
        unsupported(with(r#"{"syscall": "read", "args": []}"#), nr);
        unsupported(
            with(
                r#"{"syscall": "read", "args": [{"index": 0, "type": "dword", "op": "bitset", "val": 1}]}"#,
            ),
            nr,
        );
        unsupported(
            with(
                r#"{"syscall": "read", "args": [{"index": 6, "type": "dword", "op": "eq", "val": 1}]}"#,
            ),
            nr,
        );
        unsupported(
            with(
                r#"{"syscall": "read", "args": [{"index": 0, "type": "word", "op": "eq", "val": 1}]}"#,
            ),
            nr,
        );
        unsupported(
            with(
                r#"{"syscall": "read", "args": [{"index": 0, "type": "dword", "op": "eq", "val": -1}]}"#,
            ),
            nr,
        );
        unsupported(
            r#"{"f": {"default_action": "allow", "filter_action": "allow", "filter": []}}"#.into(),
            nr,
        );
        unsupported(
            r#"{"f": {"default_action": "notify", "filter_action": "allow", "filter": []}}"#.into(),
            nr,
        );
        assert_eq!(
            parse(&with(r#"{"syscall": "no_such_call"}"#), "f", nr).unwrap_err(),
            Error::UnknownSyscall("no_such_call".into())
        );
        assert_eq!(
            parse(&with(r#"{"syscall": "read"}"#), "g", nr).unwrap_err(),
            Error::NoFilter("g".into())
        );
        // Every one of these seccompiler refuses too.
        for json in [
            with(r#"{"syscall": "read", "action": "allow"}"#),
            with(r#"{"syscall": "read", "args": []}"#),
            with(r#"{"syscall": "no_such_call"}"#),
        ] {
            assert!(seccompiler::compile_from_json(json.as_bytes(), TargetArch::x86_64).is_err());
        }
    }

    /// `build.rs`'s quick check accepts the compact allowlist, and notices a wrong comparison
    /// in the search or in a rule.
    #[test]
    fn the_build_time_check_notices_a_wrong_program() {
        let (arch, target) = ARCHES[0];
        let json = crate::seccomp::DEFAULT_POLICY;
        let filter = parse(json, "sandbox", &mut |s| syscall_nr(target, s)).unwrap();
        let compact = filter.compile(arch).unwrap();
        let linear = seccompiler_program(json, "sandbox", target);
        let probes = filter.probes();
        same_actions(&compact, &linear, arch.audit(), &probes).unwrap();
        let socket = syscall_nr(target, "socket").unwrap();
        let mutations: [&dyn Fn(&Insn) -> bool; 4] = [
            // the search: the first interval after socket
            &|i| i.code == JGE_K && i.k == socket + 1,
            // AF_INET6 (in rules of three conditions)
            &|i| i.code == JEQ_K && i.k == 10,
            // SOCK_DGRAM after its mask
            &|i| i.code == JEQ_K && i.k == 2,
            // IPPROTO_UDP
            &|i| i.code == JEQ_K && i.k == 17,
        ];
        for (n, pick) in mutations.iter().enumerate() {
            let mut wrong = compact.clone();
            let at = wrong.iter().rposition(pick).unwrap();
            wrong[at].k += 1;
            assert!(
                same_actions(&wrong, &linear, arch.audit(), &probes).is_err(),
                "mutation {n}"
            );
        }
    }

    #[test]
    fn the_interpreter_follows_each_opcode_and_refuses_others() {
        let i = |code, jt, jf, k| Insn { code, jt, jf, k };
        // A = args[1] high word; A &= 0xf0; jset 0x10 → 1; jgt 0x40 → 2; jge 0x40 → 3; else 4.
        let prog = [
            i(LD_W_ABS, 0, 0, 28),
            i(ALU_AND_K, 0, 0, 0xf0),
            i(JSET_K, 0, 1, 0x10),
            i(RET_K, 0, 0, 1),
            i(JGT_K, 0, 1, 0x40),
            i(RET_K, 0, 0, 2),
            i(JGE_K, 1, 0, 0x40),
            i(JA, 0, 0, 1),
            i(RET_K, 0, 0, 3),
            i(RET_K, 0, 0, 4),
        ];
        check(&prog).unwrap();
        let on = |hi: u64| {
            let args = [0, (hi << 32) | 0xffff_ffff, 0, 0, 0, 0];
            run(
                &prog,
                &SeccompData {
                    args,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        assert_eq!([on(0x1f), on(0x8f), on(0x4f), on(0x2f)], [1, 2, 3, 4]);
        let (_, loaded) = run_traced(&prog, &SeccompData::default()).unwrap();
        assert_eq!(loaded, 1 << 7);
        assert!(
            run(
                &[i(0x07, 0, 0, 0), i(RET_K, 0, 0, 0)],
                &SeccompData::default()
            )
            .is_err()
        );
        assert!(
            run(
                &[i(LD_W_ABS, 0, 0, 64), i(RET_K, 0, 0, 0)],
                &SeccompData::default()
            )
            .is_err()
        );
        assert!(check(&[i(JEQ_K, 1, 0, 0), i(RET_K, 0, 0, 0)]).is_err());
        assert!(check(&[i(LD_W_ABS, 0, 0, 0)]).is_err());
    }
}
