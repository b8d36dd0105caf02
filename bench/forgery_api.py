"""The forgery corpus's second door: the API and the dashboard (bench/forgery.py runs it
after the Kafka cases). A victim tenant ran an OpenAI batch to its end (one line failed,
so there are input, output and error files); an attacker tenant, anonymous callers and a
hostile web page then try the victim's batch, files, jobs and thumbnails through every
route, with id variants and every way to authenticate (another tenant's key, its session,
the victim's key pasted as a cookie, none, the victim's own session from another origin).
After each request: a refusal (or, for reads, nothing of the victim in the answer), and
the victim's batch, files and job records exactly as before."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx2 as httpx

from bench.common import api_up
from vlmq.api.records import Records
from vlmq.core.settings import Connection
from vlmq.core.topology import connect_redis
from vlmq.deploy.stack import free_port, wait_until
from vlmq.producer import Client
from vlmq.schemas import keys

EVIL = "https://evil.example"
LINES = 4  # the victim batch's lines; the last one's image does not exist (an error file)


@dataclass
class Door:
    """The API as the run uses it: its address, the tenants' credentials, the victim's ids."""

    base: str
    proc: subprocess.Popen[bytes]
    keys: dict[str, str]  # victim, attacker (API keys)
    sessions: dict[str, str]  # victim, attacker (dashboard session ids)
    batch: str = ""
    files: list[str] = field(default_factory=list)  # input, output, error
    jobs: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)  # what must never appear to others


@dataclass
class Request:
    family: str
    method: str
    path: str
    auth: str  # attacker-key, attacker-session, victim-key-as-cookie, none, victim-session-evil
    expect_refused: bool = True


def start_api(env: dict[str, str], topic: str, bucket: str, log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    api_env = {
        **os.environ,
        **env,
        "VLMQ_JOBS_TOPIC": topic,
        "VLMQ_PORT": str(port),
        "VLMQ_MODELS": "gpt-4o-mini=fake,fake",
        "VLMQ_FILES_BUCKET": bucket,
        "VLMQ_CREATE_BUCKET": "true",
        "VLMQ_TICK_S": "0.1",
        "VLMQ_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmq.cli", "api", "serve"],
        env=api_env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: api_up(base, proc), f"vlmq api on {port}", 60)
    return base, proc


async def open_door(env: dict[str, str], topic: str, tag: str, log: Path) -> Door:
    base, proc = await asyncio.to_thread(start_api, env, topic, f"forgery-{tag}", log)
    redis = connect_redis(Connection.load({"redis_url": env["VLMQ_REDIS_URL"]}))
    try:
        records = Records(redis)
        tenants = {who: await records.create_key(f"{who}-{tag}") for who in ("victim", "attacker")}
    finally:
        await redis.aclose()
    door = Door(base, proc, tenants, {})
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for who, key in tenants.items():
            got = await http.post(
                "/dashboard/login", data={"key": key}, headers={"origin": base}, follow_redirects=False
            )
            door.sessions[who] = got.cookies["vlmq_session"]
        await _victim_batch(http, door, tag)
    return door


async def _victim_batch(http: httpx.AsyncClient, door: Door, tag: str) -> None:
    auth = {"authorization": f"Bearer {door.keys['victim']}"}
    lines = [_line(f"secret-{tag}-{i}", i == LINES - 1) for i in range(LINES)]
    files = {"file": ("in.jsonl", "\n".join(lines).encode(), "application/jsonl")}
    up = (await http.post("/v1/files", headers=auth, data={"purpose": "batch"}, files=files)).json()
    body = {"input_file_id": up["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch = (await http.post("/v1/batches", headers=auth, json=body)).json()
    for _ in range(1200):
        got = (await http.get(f"/v1/batches/{batch['id']}", headers=auth)).json()
        if got["status"] in ("completed", "failed", "expired", "cancelled"):
            break
        await asyncio.sleep(0.1)
    assert got["status"] == "completed", got
    door.batch = batch["id"]
    door.files = [up["id"], got["output_file_id"], got["error_file_id"]]
    door.secrets = [door.batch, *door.files, f"secret-{tag}", door.keys["victim"]]


def _line(custom_id: str, missing_image: bool) -> str:
    content: list[dict[str, Any]] = [{"type": "text", "text": f"describe {custom_id}"}]
    if missing_image:
        content.append({"type": "image_url", "image_url": {"url": "s3://nowhere-bucket/none.jpg"}})
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": content}],
            },
        }
    )


async def find_jobs(door: Door, client: Client) -> None:
    door.jobs = sorted([r.job_id async for r in client.store.iter_batch(door.batch)])


# -- the requests -------------------------------------------------------------------------

ROUTES = [  # (family, method, path with {b} {f} {o} {e} {j})
    ("batch", "GET", "/v1/batches/{b}"),
    ("batch", "POST", "/v1/batches/{b}/cancel"),
    ("file", "GET", "/v1/files/{f}"),
    ("file", "GET", "/v1/files/{f}/content"),
    ("file", "GET", "/v1/files/{o}/content"),
    ("file", "GET", "/v1/files/{e}/content"),
    ("file", "DELETE", "/v1/files/{f}"),
    ("dashboard", "GET", "/dashboard/batches/{b}"),
    ("dashboard", "POST", "/dashboard/batches/{b}/cancel"),
    ("dashboard", "POST", "/dashboard/batches/{b}/retry"),
    ("dashboard", "GET", "/dashboard/batches/{b}/export?format=openai"),
    ("dashboard", "GET", "/dashboard/jobs/{j}"),
    ("dashboard", "GET", "/dashboard/jobs/{j}/images/0"),
]
LISTS = ["/v1/batches", "/v1/files", "/dashboard/batches", "/dashboard/workers"]
AUTHS = ["attacker-key", "attacker-session", "victim-key-as-cookie", "none"]
HOSTILE = [{"origin": EVIL}, {"sec-fetch-site": "cross-site"}, {"origin": "null"}, {"referer": f"{EVIL}/x"}]


def _variants(ident: str) -> list[str]:
    """One id as an attacker may spell it."""
    return [
        ident,
        quote(ident, safe=""),
        "".join(f"%{b:02X}" for b in ident.encode()),
        ident + "/",
        ident + "%0A",
        ident.upper(),
        f"..%2F{ident}",
        f"{ident}%00",
    ]


def requests(door: Door, rnd: random.Random, n: int) -> list[tuple[Request, dict[str, str]]]:
    """`n` seeded requests over every route, id spelling and credential, then every list
    with the attacker's credentials, then each state-changing route from a hostile page
    with the victim's own session."""
    ids = {"b": door.batch, "f": door.files[0], "o": door.files[1], "e": door.files[2]}
    out: list[tuple[Request, dict[str, str]]] = []
    for i in range(n):
        family, method, template = ROUTES[i % len(ROUTES)]
        fill = {k: rnd.choice(_variants(v)) for k, v in ids.items()}
        fill["j"] = rnd.choice(_variants(rnd.choice(door.jobs)))
        out.append((Request(f"api-{family}", method, template.format(**fill), AUTHS[i % len(AUTHS)]), {}))
    for path in LISTS:
        for auth in ("attacker-key", "attacker-session"):
            out.append((Request("api-list", "GET", path, auth, expect_refused=False), {}))
    for _, method, template in ROUTES:
        if method != "GET":
            for headers in HOSTILE:
                path = template.format(b=door.batch, f=door.files[0], o="", e="", j="")
                out.append((Request("csrf", method, path, "victim-session-evil"), headers))
    return out


def _credentials(door: Door, auth: str) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, cookies) of a credential."""
    match auth:
        case "attacker-key":
            return {"authorization": f"Bearer {door.keys['attacker']}"}, {}
        case "attacker-session":
            return {"origin": door.base}, {"vlmq_session": door.sessions["attacker"]}
        case "victim-key-as-cookie":
            return {"origin": door.base}, {"vlmq_session": door.keys["victim"]}
        case "victim-session-evil":
            return {}, {"vlmq_session": door.sessions["victim"]}
    return {}, {}


async def send(http: httpx.AsyncClient, door: Door, r: Request, extra: dict[str, str]) -> tuple[int, str]:
    headers, cookies = _credentials(door, r.auth)
    http.cookies.clear()
    got = await http.request(
        r.method, r.path, headers=headers | extra, cookies=cookies, follow_redirects=False
    )
    return got.status_code, got.text


def judged(door: Door, r: Request, status: int, text: str) -> list[str]:
    """What went wrong with one answer: accepted where it must be refused, or a victim's
    secret (its ids, custom ids, key) that the caller did not send in what it got back."""
    wrong = []
    if r.expect_refused and status < 300:
        wrong.append(f"accepted ({status})")
    asked = unquote(unquote(r.path))  # an id the caller sent may be echoed back ("No such ...")
    leaked = [s for s in door.secrets if s in text and s.lower() not in asked.lower()]
    if leaked:
        wrong.append(f"leaked {leaked}")
    return wrong


async def victim_view(door: Door, client: Client) -> dict[str, Any]:
    """The victim as it sees itself (its batch, its files) and its jobs' Redis records."""
    auth = {"authorization": f"Bearer {door.keys['victim']}"}
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=door.base, timeout=30) as http:
        batch = (await http.get(f"/v1/batches/{door.batch}", headers=auth)).json()
        out["batch"] = {
            k: batch.get(k) for k in ("status", "request_counts", "output_file_id", "error_file_id")
        }
        out["files"] = sorted(f["id"] for f in (await http.get("/v1/files", headers=auth)).json()["data"])
        for f in door.files:
            out[f"content:{f}"] = (await http.get(f"/v1/files/{f}/content", headers=auth)).text
    pipe = client.redis.pipeline(transaction=False)
    for j in door.jobs:
        pipe.hgetall(keys.job_key(j))
        pipe.hgetall(keys.submitted_key(j))
    rows = await pipe.execute()
    out["jobs"] = [{_s(k): _s(v) for k, v in row.items()} for row in rows]
    out["counts"] = str(await client.store.batch_counts(door.batch))
    return out


def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


@dataclass
class ApiTally:
    cases: int = 0
    victim_changes: int = 0
    wrong_answers: int = 0  # accepted where refused, or a secret in the answer
    per_family: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def count(self, family: str, what: str) -> None:
        fam = self.per_family.setdefault(family, {})
        fam[what] = fam.get(what, 0) + 1


async def api_phase(
    env: dict[str, str], topic: str, tag: str, log: Path, client: Client, rnd: random.Random, n: int
) -> ApiTally:
    """Every request of `requests`, each judged and followed by a look at the victim."""
    door = await open_door(env, topic, tag, log)
    tally = ApiTally()
    try:
        await find_jobs(door, client)
        before = await victim_view(door, client)
        async with httpx.AsyncClient(base_url=door.base, timeout=30) as http:
            for r, extra in requests(door, rnd, n):
                status, text = await send(http, door, r, extra)
                tally.cases += 1
                tally.count(r.family, f"http:{status}")
                wrong = judged(door, r, status, text)
                after = await victim_view(door, client)
                if after != before:
                    tally.victim_changes += 1
                    tally.count(r.family, "victim_changes")
                    wrong.append("the victim changed")
                if wrong:
                    tally.wrong_answers += 1
                    tally.count(r.family, "wrong")
                    if len(tally.examples) < 10:
                        tally.examples.append({"request": vars(r) | {"headers": extra}, "wrong": wrong})
                before = after
    finally:
        door.proc.terminate()
        await asyncio.to_thread(door.proc.wait, 30)
    return tally
