"""``Transport`` over Redis streams with consumer groups (Redis >= 7 or Valkey >= 7.2: XAUTOCLAIM with the
deleted-ids reply, XINFO lag).

Keys of a run (``{run}`` is a literal hash tag, so a run's keys share one Redis Cluster slot and the Lua
scripts below may touch them all):

- ``work:{run}``      stream, one entry per submitted sample (id, text, loss spans); one consumer group per
                      teacher, named after the teacher, so every teacher sees every sample.
- ``dist:{run}:<id>`` hash per in-flight sample: the sample itself, its work entry id, the count of teachers
                      that answered and each teacher's encoded ``AlignedDist`` (``<teacher>/ids`` …).
                      Created by ``submit``, deleted when the trainer acks the sample or it is dead-lettered;
                      its existence is what deduplicates by sample id.
- ``ready:{run}``     stream of samples every teacher answered; one group, ``trainer``, shared by all ranks.
- ``dead:{run}``      stream of dead letters (sample id, teacher, reason, text head), capped (``dead_maxlen``).
- ``inputs:{run}``    set of the sample ids dead-lettered before reaching a teacher (``dead_letter_inputs``).
- ``state:{run}``     hash of counters: submitted, done (trained or dead), dead, finished, and the dispatcher's
                      position (``submit_at``).

Where the assembler runs: in the teacher's ``complete_work``. One Lua script acks the work entry, stores the
teacher's fields unless that (sample, teacher) already answered, increments the answer count and, on the
answer that completes the set, XADDs the sample to ``ready:{run}`` — atomically, so no extra process, no race
between two teachers finishing together, and no duplicate ready entry under redelivery.

Memory stays bounded by the window: ``submit`` (a Lua script, so several dispatchers cannot overshoot) only
adds while ``submitted - done < window``; the trainer's ack deletes the sample's hash and its work and ready
entries (XDEL), a dead letter deletes the hash and the work entry, and the dead-letter stream is capped.
So at most ``window`` samples' distributions are held: ``window * teachers * T * ~64 B`` at k = 10.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Sequence

import redis

from fuseflow.sparse import AlignedDist, Sample
from fuseflow.wire.codec import ALIGNED_FIELDS, decode_aligned, encode_aligned
from fuseflow.wire.transport import (
    REDISPATCH_LIMIT,
    ReadySample,
    Transport,
    TransportRefused,
    TransportUnavailable,
    WorkItem,
    check_result,
    validate_run,
    spans_to_json,
)

log = logging.getLogger(__name__)

TRAINER_GROUP = "trainer"
DEAD_TEXT_CHARS = 1000  # bytes of the sample text kept with a dead letter, for inspection
_SUBMIT_CHUNK = 256  # samples per submit script call
# Replies that go away by themselves: while ``reset()`` starts a fresh run the stream and its groups are briefly
# gone (NOGROUP, or UNBLOCKED for a read blocked on the deleted stream); LOADING while a restart replays the AOF.
_PASSING_REPLIES = ("NOGROUP", "UNBLOCKED", "LOADING")


def _transport_error(error: redis.RedisError, where: str) -> Exception | None:
    """The :mod:`fuseflow.wire.transport` error for a Redis error, or None for one that is a bug here."""
    if isinstance(error, (redis.AuthenticationError, redis.exceptions.NoPermissionError)):
        return TransportRefused(f"Redis at {where} refused this client: {error} (check the password or ACL user "
                                "in the Redis URL)")
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)) or (
        isinstance(error, redis.ResponseError) and str(error).startswith(_PASSING_REPLIES)
    ):
        return TransportUnavailable(f"Redis at {where}: {error}")
    return None


def _speaks_transport_errors(cls):
    """Wrap every public method (and ``__init__``) of ``cls`` so that Redis errors leave it as the transport's
    own (:class:`TransportUnavailable`, :class:`TransportRefused`): callers never import ``redis``."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapped(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except redis.RedisError as e:
                translated = _transport_error(e, _redacted(getattr(self, "redis_url", "?")))
                if translated is None:
                    raise
                if isinstance(translated, TransportUnavailable) and hasattr(self, "_connection_lost"):
                    self._connection_lost()
                raise translated from e

        return wrapped

    for name, fn in list(vars(cls).items()):
        if callable(fn) and (name == "__init__" or not name.startswith("_")):
            setattr(cls, name, wrap(fn))
    return cls


# The commands each role's process sends, directly or from the scripts above (a script's commands are checked
# against the ACL of the user that runs it): nothing else. ``ping`` for health checks; ``eval`` only when a
# restarted server lacks a script (:meth:`RedisTransport._eval`: no SCRIPT LOAD).
ROLE_COMMANDS = {
    # claim, answer (the complete script: XACK, HGET, HEXISTS, HMGET, HSET, HINCRBY, XADD ready|dead, XDEL, DEL),
    # reclaim (XAUTOCLAIM, XPENDING), its queue lag (stats: HMGET, XLEN, XINFO GROUPS), its group on first start
    "teacher": ("ping evalsha eval xgroup|create xreadgroup xack xautoclaim xpending xinfo|groups xlen xadd xdel "
                "hget hexists hmget hset hincrby del"),
    # dispatch (submit: HMGET, EXISTS, XADD, HSET, HINCRBY; dead_letter_inputs: SADD), read (XREADGROUP, HGETALL,
    # XAUTOCLAIM), ack and reject (XACK, XDEL, HGET, HMGET, HKEYS, HDEL, XADD, DEL, HINCRBY), stats, dead letters
    # (XRANGE), reset (XRANGE of the work stream, DEL, XGROUP CREATE)
    "trainer": ("ping evalsha eval xgroup|create xreadgroup xack xautoclaim xinfo|groups xlen xrange xadd xdel "
                "hget hgetall hmget hset hincrby hkeys hdel exists sadd del"),
}
# The run's keys each role touches (fuseflow.wire.redis_streams: `{run}` is a literal hash tag).
ROLE_KEYS = {
    "teacher": ("work", "ready", "dead", "state", "dist:*"),
    "trainer": ("work", "ready", "dead", "state", "inputs", "dist:*"),
}


def run_acl_rules(run: str, role: str) -> str:
    """Redis ACL rules (after ``user NAME on >PASSWORD``) for a process of run ``run`` in ``role``: an allow-list
    (issue 26) of the commands that role sends (:data:`ROLE_COMMANDS`) on the keys of that run it uses
    (:data:`ROLE_KEYS`), no channel. Everything else is refused: the keyspace-wide commands (SCAN, KEYS,
    RANDOMKEY, DBSIZE: other runs' key names), server state (SCRIPT, FUNCTION, CONFIG, CLIENT, DEBUG, MODULE,
    FLUSHALL, SHUTDOWN, …) and pub/sub. A leaked teacher credential then reaches neither another run's data
    nor the server's state.
    """
    if role not in ROLE_COMMANDS:
        raise ValueError(f"role must be one of {sorted(ROLE_COMMANDS)}, got {role!r}")
    tag = "{" + validate_run(run) + "}"
    keys = " ".join("~" + _glob_escape(f"{name.removesuffix(':*')}:{tag}") + (":*" if name.endswith(":*") else "")
                    for name in ROLE_KEYS[role])
    commands = " ".join("+" + c for c in ROLE_COMMANDS[role].split())
    return f"resetkeys {keys} resetchannels -@all {commands}"


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (SCAN MATCH, ACL key patterns)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _redacted(url: str) -> str:
    """``redis://:secret@host:6379/0`` → ``redis://host:6379/0``: errors never print a password."""
    return re.sub(r"//[^@/]*@", "//", url or "")

# KEYS: state, work, dist hash per sample. ARGV: window, dispatch position of the first sample ('' for none),
# then (id, text, spans, signature of the id, signature of the sample) per sample ('' signatures: unsigned).
# Returns how many samples it consumed (added or skipped as already in flight), stopping at a full window; with a
# position, records position + consumed as the state's 'position' in the same step (see ``submit_at``).
_SUBMIT_LUA = """
local st = redis.call('HMGET', KEYS[1], 'submitted', 'done')
local room = tonumber(ARGV[1]) - (tonumber(st[1] or 0) - tonumber(st[2] or 0))
local consumed, added = 0, 0
for i = 3, #KEYS do
  local a = 3 + (i - 3) * 5
  if redis.call('EXISTS', KEYS[i]) == 0 then
    if room <= 0 then break end
    local wid = redis.call('XADD', KEYS[2], '*', 'id', ARGV[a], 'text', ARGV[a + 1], 'spans', ARGV[a + 2])
    redis.call('HSET', KEYS[i], '_id', ARGV[a], '_text', ARGV[a + 1], '_spans', ARGV[a + 2], '_work', wid, '_n', 0)
    if ARGV[a + 3] ~= '' then redis.call('HSET', KEYS[i], '_sig_id', ARGV[a + 3], '_sig', ARGV[a + 4]) end
    redis.call('HINCRBY', KEYS[1], 'submitted', 1)
    room = room - 1
    added = added + 1
  end
  consumed = consumed + 1
end
if added > 0 then redis.call('HSET', KEYS[1], 'finished', 0) end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'position', tonumber(ARGV[2]) + consumed) end
return consumed
"""

# KEYS: work, dist hash, ready, dead, state.
# ARGV: teacher (= group), work entry id, number of teachers, 'ok' | 'error', reason, dead maxlen,
#       then field/value pairs of the encoded AlignedDist (already prefixed with '<teacher>/').
# Returns 0 ignored (duplicate, stale or finished sample), 1 stored, 2 dead-lettered, 3 stored and ready.
_COMPLETE_LUA = f"""
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if redis.call('HGET', KEYS[2], '_work') ~= ARGV[2] then return 0 end
local marker = '@' .. ARGV[1]
if redis.call('HEXISTS', KEYS[2], marker) == 1 then return 0 end
if ARGV[4] == 'error' then
  local h = redis.call('HMGET', KEYS[2], '_id', '_text')
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'sample_id', h[1], 'teacher', ARGV[1],
             'reason', ARGV[5], 'text', string.sub(h[2], 1, {DEAD_TEXT_CHARS}))
  redis.call('XDEL', KEYS[1], ARGV[2])
  redis.call('DEL', KEYS[2])
  redis.call('HINCRBY', KEYS[5], 'done', 1)
  redis.call('HINCRBY', KEYS[5], 'dead', 1)
  return 2
end
redis.call('HSET', KEYS[2], marker, 1, unpack(ARGV, 7))
local n = redis.call('HINCRBY', KEYS[2], '_n', 1)
if n == tonumber(ARGV[3]) then
  local rid = redis.call('XADD', KEYS[3], '*', 'id', redis.call('HGET', KEYS[2], '_id'))
  redis.call('HSET', KEYS[2], '_ready', rid)
  return 3
end
return 1
"""

# KEYS: dead-lettered inputs set, dead, state. ARGV: dead maxlen, then (id, reason, text) per sample.
# Returns how many were new (the set makes a second call with the same ids a no-op).
_DEAD_INPUTS_LUA = f"""
local n = 0
for i = 2, #ARGV, 3 do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'sample_id', ARGV[i], 'teacher', 'corpus',
               'reason', ARGV[i + 1], 'text', string.sub(ARGV[i + 2], 1, {DEAD_TEXT_CHARS}))
    n = n + 1
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[3], 'submitted', n)
  redis.call('HINCRBY', KEYS[3], 'done', n)
  redis.call('HINCRBY', KEYS[3], 'dead', n)
end
return n
"""

# KEYS: ready, dist hash, work, state. ARGV: trainer group, ready entry id.
# Returns 1 if this call freed the sample, 0 if it was already acked.
_ACK_LUA = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('HGET', KEYS[2], '_ready') == ARGV[2] then
  local wid = redis.call('HGET', KEYS[2], '_work')
  if wid then redis.pcall('XDEL', KEYS[3], wid) end  -- pcall: a field the teachers can write is never trusted
  redis.call('DEL', KEYS[2])
  redis.call('HINCRBY', KEYS[4], 'done', 1)
end
return 1
"""

# KEYS: ready, dist hash, work, dead, state.
# ARGV: trainer group, ready entry id, teacher, reason, 'redispatch' | 'dead' | 'drop', redispatch limit, dead maxlen,
#       sample id, text, spans (as the trainer's checked reader read them, never re-read from the hash here).
# Returns 0 already acked or freed, 1 dead-lettered, 2 redispatched to the teacher, 3 dropped: a hash the run's
# dispatcher never wrote (deleted with its ready entry, a dead letter for the record, no counter touched).
# Every value the teachers can write (_work, _redispatched, _n) goes through tonumber or pcall: never a script error.
_REJECT_LUA = f"""
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if redis.call('HGET', KEYS[2], '_ready') ~= ARGV[2] then return 0 end
local text = string.sub(ARGV[9], 1, {DEAD_TEXT_CHARS})
if ARGV[5] == 'drop' then
  redis.call('DEL', KEYS[2])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'sample_id', ARGV[8], 'teacher', ARGV[3],
             'reason', ARGV[4], 'text', text)
  return 3
end
local h = redis.call('HMGET', KEYS[2], '_work', '_redispatched')
local n = tonumber(h[2] or '0') or 0
if h[1] then redis.pcall('XDEL', KEYS[3], h[1]) end
if ARGV[5] == 'redispatch' and n < tonumber(ARGV[6]) then
  local prefix = ARGV[3] .. '/'
  for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
    if string.sub(f, 1, #prefix) == prefix then redis.call('HDEL', KEYS[2], f) end
  end
  redis.call('HDEL', KEYS[2], '@' .. ARGV[3], '_ready')
  redis.pcall('HINCRBY', KEYS[2], '_n', -1)
  redis.call('HSET', KEYS[2], '_redispatched', n + 1)
  local wid = redis.call('XADD', KEYS[3], '*', 'id', ARGV[8], 'text', ARGV[9], 'spans', ARGV[10])
  redis.call('HSET', KEYS[2], '_work', wid)
  return 2
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'sample_id', ARGV[8], 'teacher', ARGV[3],
           'reason', ARGV[4], 'text', text)
redis.call('DEL', KEYS[2])
redis.call('HINCRBY', KEYS[5], 'done', 1)
redis.call('HINCRBY', KEYS[5], 'dead', 1)
return 1
"""

# KEYS: work, ready, dead, state, inputs, then the dist hashes to delete. ARGV: the consumer groups of the work
# stream (one per teacher), then the trainer's group of the ready stream.
# One atomic step, so a teacher never sees the run without its stream or its group (NOGROUP: issue 26).
_RESET_LUA = """
local deleted = 0
for i = 1, #KEYS do deleted = deleted + redis.call('DEL', KEYS[i]) end
for i = 1, #ARGV - 1 do redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[i], '0', 'MKSTREAM') end
redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[#ARGV], '0', 'MKSTREAM')
return deleted
"""


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------------------------------------
# The trainer's checked reader of what the teachers can write (issue 26)
# ----------------------------------------------------------------------------------------------------------
#
# A teacher's Redis login may write the ready stream and the dist hashes (its ACL user must, to assemble
# samples), so every field the trainer reads from them is parsed here, and any failure becomes a reason:
# - a ready entry that is not exactly {id: <UTF-8 sample id>}, or whose hash does not name it in `_ready`: no
#   sample; acked and deleted (as an entry freed by a racing ack always was);
# - a hash without the dispatcher's signature of its sample id (`_sig_id`, an HMAC under a key only the
#   trainer holds: `authenticate`): not a sample of this run; dropped, with a dead letter for the record, and
#   never counted (it was never submitted);
# - a signed sample whose own fields are broken (text not UTF-8, spans not JSON or out of range, text or spans
#   changed since dispatch, a field no fuseflow writes): dead-lettered with the reason (a redispatch would
#   send the broken fields to the teachers again);
# - a teacher's answer that does not decode: that teacher's problem, which the trainer's feed rejects through
#   `reject_ready` (back to the teacher once, then dead-lettered), as it rejects answers failing check_ready.
# Nothing raises into the trainer.

_SAMPLE_FIELDS = frozenset({b"_id", b"_text", b"_spans", b"_work", b"_n", b"_ready", b"_redispatched", b"_sig_id", b"_sig"})
_ENTRY_ID = re.compile(rb"^[0-9]{1,20}-[0-9]{1,20}$")
_INT = re.compile(rb"^-?[0-9]{1,18}$")
UNKNOWN_WRITER = "unknown"  # the dead letter's `teacher` when no teacher can be named (a sample's own fields)


class _Malformed(ValueError):
    """A ready entry's sample that cannot be trained on, with why; ``drop``: it is no sample of this run."""

    def __init__(self, reason: str, drop: bool = False):
        super().__init__(reason)
        self.drop = drop


def sample_signature(key: bytes, run: str, *parts: str | bytes) -> str:
    """HMAC-SHA256 (hex, 128 bits) of ``parts`` under ``key``, bound to ``run``; each part length-prefixed, so no
    two different tuples sign alike."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (run, *parts):
        data = part.encode() if isinstance(part, str) else part
        mac.update(len(data).to_bytes(8, "big") + data)
    return mac.hexdigest()[:32]


def _utf8(value: bytes | None, field: str) -> str:
    if value is None:
        raise _Malformed(f"field {field} is missing")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed(f"field {field} is not UTF-8 ({e.reason} at byte {e.start})") from None


def parse_spans(raw: bytes | None) -> tuple[tuple[int, int], ...] | None:
    """The ``_spans`` field: empty for the whole text, else a JSON list of ``[start, end]`` character offsets with
    ``0 <= start <= end < 2**31`` (past the text's end is harmless: no token starts there). Raises
    :class:`ValueError` naming what is wrong."""
    if not raw:
        return None
    try:
        value = json.loads(_utf8(raw, "_spans"))
    except json.JSONDecodeError as e:
        raise _Malformed(f"field _spans is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, list):
        raise _Malformed(f"field _spans must be a JSON list of [start, end] pairs, got {type(value).__name__}")
    spans = []
    for i, pair in enumerate(value):
        ok = (isinstance(pair, list) and len(pair) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in pair))
        if not ok or not 0 <= pair[0] <= pair[1] < 2**31:
            raise _Malformed(f"field _spans[{i}] must be [start, end] with 0 <= start <= end < 2**31, got "
                             f"{json.dumps(pair)[:40]}")
        spans.append((pair[0], pair[1]))
    return tuple(spans)


def _printable(raw: bytes | None, chars: int = DEAD_TEXT_CHARS) -> str:
    """A field's head for a dead letter: what could be decoded, invalid bytes escaped."""
    return (raw or b"")[: chars * 4].decode("utf-8", "backslashreplace")[:chars]


def _ready_entry_sample(fields: dict) -> str | None:
    """The sample id of a ready entry, which the assembler writes as exactly ``{id: <sample id>}``; None for any
    other entry."""
    if set(fields) != {b"id"}:
        return None
    try:
        sample_id = fields[b"id"].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return sample_id or None


def _stream_entries(reply) -> list[tuple[bytes, dict]]:
    """Entries of a one-stream XREAD/XREADGROUP reply, in RESP2 (list) or RESP3 (dict) shape."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [e for entries in reply.values() for e in entries]
    return [e for _, entries in reply for e in entries]


@_speaks_transport_errors
class RedisTransport(Transport):
    """Redis-streams ``Transport`` of one run (see the module docstring for the keys and scripts).

    ``redis_url``: e.g. ``redis://:password@host:6379/0``. ``window``: samples in flight at most.
    ``poll_s``: the longest ``submit`` sleeps between checks of a full window. ``max_deliveries``: how
    often a sample may be delivered to one teacher before :meth:`reclaim_stale` dead-letters it (None: no
    limit).
    """

    def __init__(
        self,
        redis_url: str,
        run: str,
        teachers: Sequence[str],
        window: int = 256,
        dead_maxlen: int = 100_000,
        poll_s: float = 0.05,
        client: redis.Redis | None = None,
        max_deliveries: int | None = 5,
    ) -> None:
        super().__init__(run, teachers, window)
        if max_deliveries is not None and max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1 or None, got {max_deliveries}")
        self.max_deliveries = max_deliveries
        self.redis_url = redis_url
        self.dead_maxlen = int(dead_maxlen)
        self.poll_s = poll_s
        self.r = client if client is not None else redis.Redis.from_url(redis_url, decode_responses=False)
        tag = "{" + run + "}"
        self.k_work, self.k_ready, self.k_dead, self.k_state, self.k_inputs = (
            f"{name}:{tag}" for name in ("work", "ready", "dead", "state", "inputs")
        )
        self._k_dist_prefix = f"dist:{tag}:"
        self._submit = self.r.register_script(_SUBMIT_LUA)
        self._complete = self.r.register_script(_COMPLETE_LUA)
        self._ack = self.r.register_script(_ACK_LUA)
        self._reject = self.r.register_script(_REJECT_LUA)
        self._dead_inputs = self.r.register_script(_DEAD_INPUTS_LUA)
        self._reset = self.r.register_script(_RESET_LUA)
        self._sample_key: bytes | None = None  # the trainer's: signs what it submits, checks what it reads
        self._history_done: set[str] = set()  # trainer consumers whose own pending entries were re-read
        self._history_cursor: dict[str, str] = {}  # last pending entry re-read, per trainer consumer
        # (teacher, consumer) whose own pending work was re-read since the last outage; None: no outage yet
        self._claims_checked: set[tuple[str, str]] | None = None
        self._create_groups()

    def _create_groups(self) -> None:
        for group, stream in [*((t, self.k_work) for t in self.teachers), (TRAINER_GROUP, self.k_ready)]:
            try:
                # From id 0: a group created after submissions (a teacher added on resume) still sees them.
                self.r.xgroup_create(stream, group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def dist_key(self, sample_id: str) -> str:
        return self._k_dist_prefix + sample_id

    authenticates_samples = True

    def authenticate(self, key: bytes) -> None:
        """Sign every sample this client submits, and take from the ready stream only samples signed so (see
        "The trainer's checked reader" above): ``key`` is the trainer's secret, never written to Redis, so a
        client with the teachers' login can neither forge a sample nor change a sample's text (issue 26)."""
        if len(key) < 16:
            raise ValueError("the sample key must have at least 16 bytes")
        self._sample_key = bytes(key)

    def sign_in_flight(self) -> int:
        """Sign the samples in flight as they are now, under the key of :meth:`authenticate`: for a trainer that
        resumes a run without the key its samples were signed with. Returns how many were signed."""
        if self._sample_key is None:
            raise ValueError("sign_in_flight needs a key: call authenticate(key) first")
        ids = sorted(self._work_sample_ids())
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(self.dist_key(i), "_id", "_text", "_spans")
        signed = 0
        pipe_set = self.r.pipeline(transaction=False)
        for i, (sid, text, spans) in zip(ids, pipe.execute() if ids else []):
            if sid is None or text is None:
                continue
            sig_id, sig = self._signatures(i, text.decode("utf-8", "replace"), (spans or b"").decode("utf-8", "replace"))
            pipe_set.hset(self.dist_key(i), mapping={"_sig_id": sig_id, "_sig": sig})
            signed += 1
        if signed:
            pipe_set.execute()
        return signed

    def _signatures(self, sample_id: str, text: str, spans: str) -> tuple[str, str]:
        if self._sample_key is None:
            return "", ""
        return (sample_signature(self._sample_key, self.run, "id", sample_id),
                sample_signature(self._sample_key, self.run, "sample", sample_id, text, spans))

    def _eval(self, script, keys: list, args: list):
        """Run a registered script by its SHA, sending its body (EVAL) only if the server lacks it (a restarted
        server): no SCRIPT LOAD, which the roles' ACL users are not allowed (issue 26)."""
        try:
            return self.r.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self.r.eval(script.script, len(keys), *keys, *args)

    # -- dispatcher -------------------------------------------------------------------------------------------

    def submit(self, samples: Sequence[Sample], timeout_s: float | None = None) -> None:
        self._submit_samples(samples, timeout_s, None)

    def submit_at(self, position: int, samples: Sequence[Sample], timeout_s: float | None = None) -> None:
        self._submit_samples(samples, timeout_s, int(position))

    def dispatch_position(self) -> int:
        return int(self.r.hget(self.k_state, "position") or 0)

    def _submit_samples(self, samples: Sequence[Sample], timeout_s: float | None, position: int | None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(samples)
        sleep = 0.001
        while pending:
            chunk = pending[:_SUBMIT_CHUNK]
            keys = [self.k_state, self.k_work, *(self.dist_key(s.id) for s in chunk)]
            args: list = [self.window, "" if position is None else position]
            for s in chunk:
                spans = spans_to_json(s.loss_spans)
                args += [s.id, s.text, spans, *self._signatures(s.id, s.text, spans)]
            consumed = int(self._eval(self._submit, keys, args))
            pending = pending[consumed:]
            if position is not None:
                position += consumed
            if consumed == len(chunk):
                sleep = 0.001
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"submit: dispatch window of {self.window} samples still full after {timeout_s} s "
                    f"({len(pending)} samples not queued, first {pending[0].id!r}); is the trainer acking?"
                )
            time.sleep(sleep)
            sleep = min(sleep * 2, self.poll_s)

    def finish_submissions(self) -> None:
        self.r.hset(self.k_state, "finished", 1)

    def dead_letter_inputs(self, items: Sequence[tuple[str, str, str]]) -> int:
        new = 0
        for start in range(0, len(items), _SUBMIT_CHUNK):
            args: list = [self.dead_maxlen]
            for sample_id, reason, text in items[start : start + _SUBMIT_CHUNK]:
                args += [sample_id, reason, text]
            new += int(self._eval(self._dead_inputs, [self.k_inputs, self.k_dead, self.k_state], args))
        return new

    # -- teacher worker ---------------------------------------------------------------------------------------

    def _work_items(self, teacher: str, entries) -> list[WorkItem]:
        """The samples of work entries; an entry that is not ``{id, text, spans}`` as the dispatcher writes them
        (another client with the teachers' login can add entries) is acked and skipped, never raised into the
        worker (issue 26)."""
        items, junk = [], []
        for entry_id, fields in entries:
            if not fields:  # deleted since delivery (sample trained or dead-lettered)
                continue
            try:
                if set(fields) != {b"id", b"text", b"spans"}:
                    raise ValueError(f"fields {sorted(f.decode('utf-8', 'replace') for f in fields)}")
                sample = Sample(fields[b"id"].decode("utf-8"), fields[b"text"].decode("utf-8"),
                                parse_spans(fields[b"spans"]))
            except ValueError as e:  # UnicodeDecodeError and _Malformed included
                log.warning("work entry %s of run %r is not one the dispatcher writes (%s): skipped",
                            _s(entry_id), self.run, e)
                junk.append(entry_id)
                continue
            items.append(WorkItem(_s(entry_id), sample))
        if junk:
            self.r.xack(self.k_work, teacher, *junk)
        return items

    def claim_work(self, teacher: str, consumer: str, count: int, block_ms: int) -> list[WorkItem]:
        """New work for ``consumer``; first, after an outage, the work already delivered to it and never
        answered. A worker completes what it holds before it claims again, so such entries are claims whose reply
        was lost (the server ran XREADGROUP or XAUTOCLAIM, the connection dropped before the reply came: a
        restart); nobody else would take them before the reclaim idle time (:meth:`reclaim_stale`)."""
        self._check_teacher(teacher)
        while self._claims_checked is not None and (teacher, consumer) not in self._claims_checked:
            entries = _stream_entries(self.r.xreadgroup(teacher, consumer, {self.k_work: "0"}, count=count))
            gone = [eid for eid, fields in entries if not fields]  # deleted since delivery: nothing to do
            if gone:
                self.r.xack(self.k_work, teacher, *gone)
            if not entries:
                self._claims_checked.add((teacher, consumer))
            elif len(gone) < len(entries):
                return self._work_items(teacher, entries)
        reply = self.r.xreadgroup(
            teacher, consumer, {self.k_work: ">"}, count=count, block=block_ms if block_ms > 0 else None
        )
        return self._work_items(teacher, _stream_entries(reply))

    def complete_work(
        self, teacher: str, item: WorkItem, dist: AlignedDist | None = None, error: str | None = None
    ) -> None:
        self.complete_many(teacher, [(item, dist, error)])

    def complete_many(self, teacher: str, results: Sequence[tuple[WorkItem, AlignedDist | None, str | None]]) -> None:
        self._check_teacher(teacher)
        for item, dist, error in results:
            check_result(item, dist, error)
        prefix = f"{teacher}/".encode()
        calls = []
        for item, dist, error in results:
            args: list = [
                teacher,
                item.entry_id,
                len(self.teachers),
                "ok" if error is None else "error",
                error or "",
                self.dead_maxlen,
            ]
            if dist is not None:
                for name, value in encode_aligned(dist).items():
                    args += [prefix + name, value]
            calls.append(([self.k_work, self.dist_key(item.sample.id), self.k_ready, self.k_dead, self.k_state], args))
        self._eval_many(self._complete, calls)

    def _eval_many(self, script, calls: list[tuple[list, list]]) -> list:
        """Run ``script`` once per (keys, args) in one pipelined round trip. redis-py's own pipelined
        scripts add a SCRIPT EXISTS round trip per pipeline; here a missing script (a restarted server)
        is sent only when EVALSHA reports it (:meth:`_eval`)."""
        if not calls:
            return []
        pipe = self.r.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        results = pipe.execute(raise_on_error=False)
        for i, res in enumerate(results):
            if isinstance(res, redis.exceptions.NoScriptError):
                results[i] = self._eval(script, *calls[i])  # sends the body: the server caches it from then on
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        return results

    def reclaim_stale(self, teacher: str, consumer: str, min_idle_ms: int, count: int) -> list[WorkItem]:
        """Take over deliveries idle for ``min_idle_ms`` (their replica died). A sample already delivered
        more than ``max_deliveries`` times is dead-lettered instead: every replica that took it died before
        answering, so it is taken for a poison sample (one that crashes the process, which the worker's own
        retry limit cannot catch) rather than handed to the next replica to kill."""
        self._check_teacher(teacher)
        items = self._work_items(teacher, self._autoclaim(self.k_work, teacher, consumer, min_idle_ms, count))
        if self.max_deliveries is None or not items:
            return items
        pipe = self.r.pipeline(transaction=False)
        for it in items:
            pipe.xpending_range(self.k_work, teacher, min=it.entry_id, max=it.entry_id, count=1)
        delivered = [int(p[0]["times_delivered"]) if p else 0 for p in pipe.execute()]
        poison = [(it, n) for it, n in zip(items, delivered) if n > self.max_deliveries]
        if poison:
            self.complete_many(teacher, [
                (it, None, f"delivered {n} times to teacher {teacher} without an answer (over max_deliveries="
                 f"{self.max_deliveries}): each replica that took it stopped before answering")
                for it, n in poison
            ])
        return [it for it, n in zip(items, delivered) if n <= self.max_deliveries]

    def _autoclaim(self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int) -> list:
        claimed: list = []
        start = "0-0"
        # XAUTOCLAIM scans at most 10 * COUNT pending entries per call: follow its cursor to the end.
        while len(claimed) < count:
            reply = self.r.xautoclaim(stream, group, consumer, min_idle_ms, start_id=start, count=count - len(claimed))
            start, entries = _s(reply[0]), reply[1]
            claimed += [e for e in entries if e[0] is not None]
            if start == "0-0":
                break
        return claimed

    # -- trainer ----------------------------------------------------------------------------------------------

    def next_ready(self, consumer: str, count: int, block_ms: int) -> list[ReadySample]:
        if consumer not in self._history_done:
            # After a restart: what this consumer read but never acked comes first, paged by a cursor.
            cursor = self._history_cursor.get(consumer, "0")
            entries = _stream_entries(self.r.xreadgroup(TRAINER_GROUP, consumer, {self.k_ready: cursor}, count=count))
            if len(entries) < count:
                self._history_done.add(consumer)
            if entries:
                self._history_cursor[consumer] = _s(entries[-1][0])
                return self._ready_samples(entries)
        reply = self.r.xreadgroup(
            TRAINER_GROUP, consumer, {self.k_ready: ">"}, count=count, block=block_ms if block_ms > 0 else None
        )
        return self._ready_samples(_stream_entries(reply))

    def reclaim_ready(self, consumer: str, min_idle_ms: int, count: int) -> list[ReadySample]:
        return self._ready_samples(self._autoclaim(self.k_ready, TRAINER_GROUP, consumer, min_idle_ms, count))

    def _ready_samples(self, entries) -> list[ReadySample]:
        """The checked reader (see "The trainer's checked reader" above): every field of every ready entry and
        of the hash it names is parsed here; what fails is acked and dropped or dead-lettered with its reason,
        or handed on with a teacher's problem for the feed to reject. Never raises for what a teacher wrote."""
        entries = [(_s(eid), fields) for eid, fields in entries if fields]
        if not entries:
            return []
        named, orphans = [], []
        for entry_id, fields in entries:
            sample_id = _ready_entry_sample(fields)
            if sample_id is None:
                log.warning("ready entry %s of run %r is not one fuseflow writes (fields %s): dropped", entry_id,
                            self.run, _printable(b" ".join(fields)[:120], 120))
                orphans.append(entry_id)
            else:
                named.append((entry_id, sample_id))
        pipe = self.r.pipeline(transaction=False)
        for _, sample_id in named:
            pipe.hgetall(self.dist_key(sample_id))
        hashes = pipe.execute() if named else []
        out, rejected = [], []
        for (entry_id, sample_id), h in zip(named, hashes, strict=True):
            if not h or h.get(b"_ready") != entry_id.encode():
                orphans.append(entry_id)  # freed by an ack that raced this read, or forged: nothing to train on
                continue
            try:
                out.append(self._read_sample(entry_id, sample_id, h))
            except _Malformed as e:
                rejected.append((entry_id, sample_id, h, e))
        if orphans:
            pipe = self.r.pipeline(transaction=False)
            pipe.xack(self.k_ready, TRAINER_GROUP, *orphans)
            pipe.xdel(self.k_ready, *orphans)
            pipe.execute()
        for entry_id, sample_id, h, e in rejected:
            mode = "drop" if e.drop else "dead"
            outcome = self._reject_entry(entry_id, sample_id, UNKNOWN_WRITER, str(e), mode, _printable(h.get(b"_text")), "")
            log.warning("sample %s of run %r: ready entry %s rejected (%s): %s", sample_id, self.run, entry_id,
                        outcome, e, extra={"fields": {"sample": sample_id, "outcome": outcome}})
        return out

    def _read_sample(self, entry_id: str, sample_id: str, h: dict[bytes, bytes]) -> ReadySample:
        """The sample and each teacher's answer of hash ``h``, every field checked; raises :class:`_Malformed`."""
        if self._sample_key is not None and not hmac.compare_digest(
            h.get(b"_sig_id") or b"", self._signatures(sample_id, "", "")[0].encode()
        ):
            raise _Malformed("not a sample this run's dispatcher sent (its dist hash lacks the dispatcher's "
                             "signature): written by a client with the teachers' Redis login?", drop=True)
        if h.get(b"_id") != sample_id.encode():
            raise _Malformed(f"field _id {_printable(h.get(b'_id'), 60)!r} is not the sample id {sample_id!r}")
        text = _utf8(h.get(b"_text"), "_text")
        raw_spans = h.get(b"_spans", b"")
        spans = parse_spans(raw_spans)
        if not _ENTRY_ID.match(h.get(b"_work") or b""):
            raise _Malformed(f"field _work must be a stream entry id, got {_printable(h.get(b'_work'), 40)!r}")
        for field in (b"_n", b"_redispatched"):
            if field in h and not _INT.match(h[field]):
                raise _Malformed(f"field {field.decode()} must be an integer, got {_printable(h[field], 40)!r}")
        if self._sample_key is not None and not hmac.compare_digest(
            h.get(b"_sig") or b"", self._signatures(sample_id, text, raw_spans.decode())[1].encode()
        ):
            raise _Malformed("the text or loss spans changed after dispatch (the dispatcher's signature does not "
                             "match): written by a client with the teachers' Redis login?")
        teachers = set(self.teachers)
        per_teacher: dict[str, dict[bytes, bytes]] = {t: {} for t in self.teachers}
        problems: dict[str, str] = {}
        for key, value in h.items():
            if key in _SAMPLE_FIELDS:
                continue
            prefix, sep, name = key.partition(b"/")
            if not sep and prefix[:1] == b"@":
                prefix = prefix[1:]  # '@teacher': the marker of its answer
            who = prefix.decode("utf-8", "replace")
            if who not in teachers:
                raise _Malformed(f"unexpected field {_printable(key, 60)!r} (no field of a fuseflow sample, nor of "
                                 f"one of the run's teachers {self.teachers})")
            if not sep:
                continue
            if name not in ALIGNED_FIELDS:
                problems.setdefault(who, f"unexpected field {_printable(key, 60)!r} in its answer")
            per_teacher[who][name] = value
        dists = {}
        for t, fields in per_teacher.items():
            if not fields or t in problems:
                continue
            try:  # a teacher on another fuseflow version, or a rogue writer: the trainer rejects, never crashes
                dists[t] = decode_aligned(fields)
            except Exception as e:  # noqa: BLE001 - any decode failure is this entry's problem
                problems[t] = f"undecodable entry: {e}"
        return ReadySample(entry_id, Sample(sample_id, text, spans), dists, problems)

    def reject_ready(self, item: ReadySample, teacher: str, reason: str, redispatch: bool) -> str:
        return self._reject_entry(item.entry_id, item.sample.id, teacher, reason,
                                  "redispatch" if redispatch else "dead", item.sample.text,
                                  spans_to_json(item.sample.loss_spans))

    def _reject_entry(self, entry_id: str, sample_id: str, teacher: str, reason: str, mode: str, text: str,
                      spans: str) -> str:
        keys = [self.k_ready, self.dist_key(sample_id), self.k_work, self.k_dead, self.k_state]
        args = [TRAINER_GROUP, entry_id, teacher, reason, mode, REDISPATCH_LIMIT, self.dead_maxlen, sample_id, text,
                spans]
        return {0: "gone", 1: "dead", 2: "redispatched", 3: "dropped"}[int(self._eval(self._reject, keys, args))]

    def ack_ready(self, items: Sequence[ReadySample]) -> None:
        if not items:
            return
        calls = [
            ([self.k_ready, self.dist_key(it.sample.id), self.k_work, self.k_state], [TRAINER_GROUP, it.entry_id])
            for it in items
        ]
        self._eval_many(self._ack, calls)

    # -- monitoring -------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(self.k_state, "submitted", "done", "dead", "finished")
        pipe.xlen(self.k_work)
        pipe.xlen(self.k_ready)
        pipe.xinfo_groups(self.k_work)
        pipe.xinfo_groups(self.k_ready)
        (submitted, done, dead, finished), n_work, n_ready, work_groups, ready_groups = pipe.execute()
        submitted, done = int(submitted or 0), int(done or 0)

        def group(g: dict) -> dict:
            return {"pending": int(g["pending"]), "lag": None if g.get("lag") is None else int(g["lag"])}

        by_name = {_s(g["name"]): group(g) for g in work_groups}
        trainer = next((group(g) for g in ready_groups if _s(g["name"]) == TRAINER_GROUP), None)
        return {
            "submitted": submitted,
            "done": done,
            "in_flight": submitted - done,
            "window": self.window,
            "finished": bool(int(finished or 0)),
            "work": int(n_work),
            "ready": int(n_ready),
            "dead_letters": int(dead or 0),
            "teachers": {t: by_name.get(t, {"pending": 0, "lag": None}) for t in self.teachers},
            "trainer": trainer or {"pending": 0, "lag": None},
        }

    def dead_letters(self, count: int = 100) -> list[dict]:
        return [
            {
                "sample_id": _s(f[b"sample_id"]),
                "teacher": _s(f[b"teacher"]),
                "reason": _s(f[b"reason"]),
                "text": f[b"text"].decode(errors="replace"),
            }
            for _, f in self.r.xrange(self.k_dead, count=count)
        ]

    def is_finished(self) -> bool:
        submitted, done, finished = self.r.hmget(self.k_state, "submitted", "done", "finished")
        return bool(int(finished or 0)) and int(submitted or 0) == int(done or 0)

    def reset(self) -> int:
        """Delete every key of this run and recreate the consumer groups: a fresh start under the same run
        name (otherwise a run name resumes where it was). Returns the number of keys deleted."""
        keys = [self.k_work, self.k_ready, self.k_dead, self.k_state, self.k_inputs,
                *(self.dist_key(i) for i in self._work_sample_ids())]
        deleted = int(self._eval(self._reset, keys, [*self.teachers, TRAINER_GROUP]))
        self._history_done.clear()
        self._history_cursor.clear()
        return deleted

    def _work_sample_ids(self) -> set[str]:
        """Ids of the samples in flight: every dist hash of the run has a live work entry (the scripts create,
        replace and delete the two together), so walking the work stream finds them without SCAN, which lists
        every run's keys and which the roles' ACL users are not allowed (issue 26)."""
        ids, start = set(), "-"
        while True:
            page = self.r.xrange(self.k_work, min=start, max="+", count=1000)
            ids.update(f[b"id"].decode("utf-8", "replace") for _, f in page if b"id" in f)
            if len(page) < 1000:
                return ids
            start = "(" + _s(page[-1][0])

    def _connection_lost(self) -> None:
        """After an outage a claim's reply may have been lost: re-read each consumer's own pending work."""
        self._claims_checked = set()

    def close(self) -> None:
        self.r.close()
