"""serve: t classification services on one base model, over HTTP (FastAPI + uvicorn).

One process loads one base model and any number of adapters of it (LoRA, DoRA, IA3, prompt or prefix tuning;
ours or peft's) and of students (distil/rnn, which run on their own). Requests that arrive together are
batched: one forward of the unmerged base model runs every row with its own adapter's terms, virtual tokens,
layer norms and head (multi_adapter.add_adapter, multi_adapter.routed, multi_adapter.classify). Read top to
bottom: the request and response bodies -> the service (the long-lived model object) -> the batcher (a queue
drained by one worker) -> the HTTP app -> `run.py serve`.

    POST   /classify         {"inputs": [{"adapter": "cola", "text": "..."}, ...]} -> {"outputs": [...]}
    GET    /health           {"status": "ok", ...}
    GET    /adapters         what is loaded: name, kind, method, rank, task, labels, size
    PUT    /adapters/{name}  load DIR (a directory under --adapters-dir) as NAME, at runtime
    DELETE /adapters/{name}  unload it

The service keeps no state but the adapters it was given: to scale out, run several behind any HTTP load
balancer.
"""
import asyncio
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from multi_adapter import Routing, add_adapter, classify, remove_adapter, rename_adapter, routed
from utils import UserError, is_student_dir, read_adapter

METHODS = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3", "prompt": "prompt tuning", "prefix": "prefix tuning"}
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")  # an adapter's name: a URL path segment, no '..' tricks
MAX_TEXT_CHARS = 20_000  # a sentence is truncated to the adapter's max_length tokens anyway
log = logging.getLogger("serve")


# --------------------------------------------------------------------------- the bodies

class Input(BaseModel):
    adapter: StrictStr = Field(description="the name of a loaded adapter or student (GET /adapters)")
    text: Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the sentence")]


class ClassifyRequest(BaseModel):
    inputs: Annotated[list[Input], Field(min_length=1, description="at most --max-batch of them")]


class Output(BaseModel):
    adapter: str
    label: str
    probability: float = Field(description="the probability of `label`, the likeliest")
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    outputs: list[Output] = Field(description="one per input, in input order")


class AdapterInfo(BaseModel):
    name: str
    kind: str = Field(description="adapter (runs on the shared base model) or student (runs on its own)")
    method: str = Field(description="LoRA, DoRA, IA3, prompt or prefix tuning, or the student's kind (its recurrent "
                                    "cell, or its transformer layers)")
    rank: int | None = None
    task: str | None = None
    labels: list[str]
    base: str | None = Field(None, description="the base model the adapter was trained on, as it recorded it")
    parameters: int
    size: int = Field(description="bytes of its weights in memory")


class AdapterList(BaseModel):
    base: str | None
    adapters: list[AdapterInfo]


class LoadRequest(BaseModel):
    path: StrictStr | None = Field(None, description="its directory, relative to --adapters-dir (default: NAME)")


class Health(BaseModel):
    status: str
    base: str | None
    adapters: int
    queued: int = Field(description="requests waiting for the next batch")
    batches: int = Field(description="forward passes run so far")
    rows: int = Field(description="inputs classified so far")


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong, in one line")


def errors(*codes):
    """The error answers of an endpoint, for its schema at /docs: all are ErrorBody."""
    return {code: {"model": ErrorBody} for code in codes}


class ServeError(Exception):
    """A request the service refuses: an HTTP status and a one-line message for the client."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------- the service

@dataclass
class Loaded:
    info: AdapterInfo
    max_length: int
    model: object = None       # a student's own model; None for an adapter of the base model
    tokenizer: object = None   # a student's own tokenizer
    add_special_tokens: bool = False


@dataclass
class Row:
    adapter: str
    ids: list


@dataclass
class Service:
    """The long-lived object: the base model with every adapter added (multi_adapter.add_adapter), the students, and
    the one lock that a forward and a change of the adapters take in turn."""
    model: object              # the base classifier (None: students only)
    tokenizer: object
    info: dict                 # backbones.load_classifier's
    base_name: str | None
    device: torch.device
    amp: object = None
    loaded: dict = field(default_factory=dict)   # name -> Loaded
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ----- adapters in and out

    def load(self, name, path, tokenizer=None):
        """Read the adapter or student in `path`, check it fits, and serve it as `name` (replacing one of that
        name). UserError when it cannot be read or does not fit; the service is then as it was."""
        from predict import label_count, load_student_classifier
        if is_student_dir(path):
            clf, tok, extras, max_length = load_student_classifier(path, tokenizer, self.device)
            clf.eval()
            params = sum(p.numel() for p in clf.parameters())
            cfg = extras.get("student", {})
            labels = extras.get("labels") or [f"LABEL_{i}" for i in range(cfg.get("num_labels", 2))]
            n = len(cfg.get("layers", []))
            method = (f"transformer ({n} layer{'' if n == 1 else 's'} of {cfg.get('family')})"
                      if cfg.get("kind") == "transformer" else f"DistilRNN ({cfg.get('rnn_type', 'rnn')})")
            info = AdapterInfo(name=name, kind="student", method=method,
                               task=extras.get("task"), labels=labels, base=None, parameters=params,
                               size=sum(p.numel() * p.element_size() for p in clf.parameters()))
            entry = Loaded(info, max_length, clf, tok, getattr(tok, "cls_token", None) is not None)
            with self.lock:
                self._drop(name)
                self.loaded[name] = entry
            return info
        if self.model is None:
            raise UserError(f"{name}: an adapter needs a base model, and this service runs students only; start it "
                            f"with --model or with an adapter among its --adapter flags.")
        settings, tensors, extras = read_adapter(path)
        labels = extras.get("labels") or [f"LABEL_{i}" for i in range(label_count((settings, tensors, {})))]
        rows = next((t.shape[0] for k, t in tensors.items() if k in ("score.weight", "classifier.weight")), len(labels))
        if len(labels) != rows:
            raise UserError(f"adapter {name}: its run_config.json names {len(labels)} labels, its head has {rows} "
                            f"rows; they must agree.")
        info = AdapterInfo(name=name, kind="adapter", method=METHODS[settings["kind"]],
                           rank=settings.get("r") if settings["kind"] in ("lora", "dora") else None,
                           task=extras.get("task"),
                           labels=labels, base=extras.get("model") or settings.get("base_model_name_or_path"),
                           parameters=sum(t.numel() for t in tensors.values()),
                           size=sum(t.numel() * t.element_size() for t in tensors.values()))
        virtual = settings.get("num_virtual_tokens") or 0  # prompt and prefix tuning's, before every sentence
        max_length = min(extras.get("max_length") or 1024, self.info["block_size"] - virtual)
        with self.lock:
            new = name + "\0new"  # added beside the one it replaces, which stays when the new one does not fit
            try:
                add_adapter(self.model, new, settings, tensors, head_names=self.info["head"])
            except ValueError as e:
                raise UserError(f"adapter {name} does not fit the base model {self.base_name}: {e}.") from None
            self._drop(name)
            rename_adapter(self.model, new, name)
            self.loaded[name] = Loaded(info, max_length, add_special_tokens=self.info["add_special_tokens"])
        return info

    def unload(self, name):
        with self.lock:
            if name not in self.loaded:
                raise self.unknown(name)
            self._drop(name)

    def _drop(self, name):
        entry = self.loaded.pop(name, None)
        if entry is not None and entry.model is None:
            remove_adapter(self.model, name)

    def unknown(self, name):
        names = ", ".join(sorted(self.loaded)) or "none"
        return ServeError(404, f"unknown adapter {name!r}; loaded: {names}")

    # ----- requests

    def encode(self, inputs):
        """[Row] for the inputs: each text tokenized for its adapter (truncated to its max_length as
        data.Examples.encode does). ServeError: an unknown adapter (404), a text of no tokens (422)."""
        rows = []
        for i, item in enumerate(inputs):
            entry = self.loaded.get(item.adapter)
            if entry is None:
                raise self.unknown(item.adapter)
            tok = entry.tokenizer or self.tokenizer
            ids = tok(item.text, add_special_tokens=entry.add_special_tokens)["input_ids"]
            if not ids:
                raise ServeError(422, f"inputs.{i}.text encodes to no tokens: give a sentence")
            n = entry.max_length
            if len(ids) > n:
                ids = ids[:n - 1] + ids[-1:] if entry.add_special_tokens and n > 1 else ids[:n]
            rows.append(Row(item.adapter, ids))
        return rows

    def run(self, rows):
        """One batch: every adapter row in ONE forward of the base model (rows sorted by adapter, each span
        with its own adapter), each student's rows in one forward of the student. Returns, per row, its
        output (a dict) or a ServeError (its adapter was unloaded while it waited)."""
        results = [None] * len(rows)
        with self.lock, torch.inference_mode():
            groups = {}
            for i, row in enumerate(rows):
                groups.setdefault(row.adapter, []).append(i)
            on_base = [n for n in groups if n in self.loaded and self.loaded[n].model is None]
            if on_base:
                self._forward(self.model, self.tokenizer.pad_token_id, on_base, groups, rows, results)
            for n in groups:
                entry = self.loaded.get(n)
                if entry is None:
                    for i in groups[n]:
                        results[i] = self.unknown(n)
                elif entry.model is not None:
                    self._forward(entry.model, entry.tokenizer.pad_token_id, [n], groups, rows, results)
        return results

    def _forward(self, model, pad_id, names, groups, rows, results):
        from train_utils import autocast
        order = [i for n in names for i in groups[n]]
        spans, start = [], 0
        for n in names:
            spans.append((n, start, start + len(groups[n])))
            start += len(groups[n])
        seqs = [rows[i].ids for i in order]
        lengths = torch.tensor([len(s) for s in seqs])
        T = int(lengths.max())
        ids = torch.full((len(seqs), T), pad_id if pad_id is not None else 0, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        with routed(model, Routing(spans, lengths)), autocast(self.device, self.amp):
            logits = classify(model, ids.to(self.device), mask.to(self.device))
        probs = logits.float().softmax(-1).cpu()
        for (n, s, e) in spans:
            labels = self.loaded[n].info.labels
            for r in range(s, e):
                p = probs[r, :len(labels)].tolist()
                k = max(range(len(p)), key=p.__getitem__)
                results[order[r]] = {"adapter": n, "label": labels[k], "probability": p[k],
                                     "probabilities": dict(zip(labels, p))}


# --------------------------------------------------------------------------- batching

class Batcher:
    """A queue of requests drained by one worker: it takes everything that has arrived, and more while it
    keeps coming (each next request within `window` seconds of the last, for at most LINGER windows in all),
    up to max_batch rows, never splitting a request; and runs it as one Service.run in its own thread, one
    batch at a time, while the event loop takes new requests. Under load, the clients answered by one batch
    send their next requests in a burst that a fixed window would cut short: the next batch waits for the
    burst, not for the slowest of them (a gap of one window ends it)."""
    LINGER = 10

    def __init__(self, service, window, max_batch):
        self.service, self.window, self.max_batch = service, window, max_batch
        self.queue = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.task = None
        self.carry = None  # a request that did not fit the last batch: first in the next
        self.batches = self.rows = 0

    async def start(self):
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self.work())

    async def stop(self):
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def classify(self, rows):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((rows, future))
        try:
            return await future
        finally:
            future.cancel()  # a client gone (the handler cancelled): its rows are skipped if not yet run

    async def next_batch(self):
        loop = asyncio.get_running_loop()
        batch = [self.carry or await self.queue.get()]
        self.carry = None
        n = len(batch[0][0])
        start = loop.time()
        while n < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                timeout = min(self.window, start + self.LINGER * self.window - loop.time())
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except TimeoutError:
                    break
            if n + len(item[0]) > self.max_batch:
                self.carry = item
                break
            batch.append(item)
            n += len(item[0])
        return [(rows, f) for rows, f in batch if not f.done()]

    async def work(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.next_batch()
            if not batch:
                continue
            rows = [r for request, _ in batch for r in request]
            self.batches, self.rows = self.batches + 1, self.rows + len(rows)
            try:
                results = await loop.run_in_executor(self.executor, self.service.run, rows)
            except Exception as e:  # a bug, not the client's doing: every request of the batch gets a 500
                log.exception("the forward of a batch failed")
                for _, f in batch:
                    if not f.done():
                        f.set_exception(ServeError(500, f"internal error ({type(e).__name__}); the server log "
                                                        f"has the details"))
                continue
            start = 0
            for request, f in batch:
                mine = results[start:start + len(request)]
                start += len(request)
                if f.done():
                    continue
                error = next((r for r in mine if isinstance(r, ServeError)), None)
                f.set_exception(error) if error else f.set_result(mine)


# --------------------------------------------------------------------------- the HTTP app

def one_line(errors):
    """pydantic's validation errors as one line: where, what (and how many more)."""
    def where(e):
        return ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where(first)}: {first.get('msg', 'invalid')}{more}"


def build_app(service, batcher, adapters_dir=None, max_batch=64):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="run.py serve", lifespan=lifespan,
                  description="Adapters of one base model (and students) classifying text; requests that arrive "
                              "together run as one batch, each row with its own adapter.")

    @app.exception_handler(ServeError)
    async def serve_error(request, e):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
        if any(tuple(err.get("loc", ())) == ("body",) for err in errors):
            return JSONResponse({"error": 'the body must be a JSON object, {"inputs": [{"adapter": NAME, "text": '
                                          'TEXT}, ...]}, sent with Content-Type: application/json'}, status_code=422)
        return JSONResponse({"error": one_line(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request, e):  # logged with its traceback by the server; the client gets one line
        return JSONResponse({"error": f"internal error ({type(e).__name__}); the server log has the details"},
                            status_code=500)

    @app.post("/classify", response_model=ClassifyResponse, responses=errors(400, 404, 413, 422, 500))
    async def classify(body: ClassifyRequest, request: Request):
        if len(body.inputs) > max_batch:
            raise ServeError(413, f"inputs has {len(body.inputs)} items; at most {max_batch} per request "
                                  f"(--max-batch): split it")
        work = asyncio.ensure_future(batcher.classify(service.encode(body.inputs)))
        gone = asyncio.ensure_future(disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():  # the client left: its rows are dropped from the queue, nobody reads an answer
            work.cancel()
            return Response(status_code=499)
        return {"outputs": work.result()}

    @app.get("/health", response_model=Health)
    async def health():
        return {"status": "ok", "base": service.base_name, "adapters": len(service.loaded),
                "queued": batcher.queue.qsize() if batcher.queue else 0, "batches": batcher.batches,
                "rows": batcher.rows}

    @app.get("/adapters", response_model=AdapterList)
    async def adapters():
        return {"base": service.base_name, "adapters": [e.info for _, e in sorted(service.loaded.items())]}

    @app.put("/adapters/{name}", response_model=AdapterInfo, status_code=201, responses=errors(400, 403, 404, 422))
    def load(name: str, body: Annotated[LoadRequest | None, Body()] = None):  # def: runs in a thread
        if adapters_dir is None:
            raise ServeError(403, "loading at runtime is off: start the service with --adapters-dir DIR")
        if not NAME.fullmatch(name):
            raise ServeError(422, f"adapter name {name[:80]!r}: use letters, digits, '_', '-', '.' (at most 64)")
        relative = (body.path if body and body.path is not None else name)
        path = resolve_under(adapters_dir, relative)
        try:
            return service.load(name, path)
        except UserError as e:
            message = str(e).replace(str(path), relative).replace(str(adapters_dir), "<adapters-dir>")
            raise ServeError(422, message.removeprefix("--adapter ")) from None

    @app.delete("/adapters/{name}", responses=errors(404))
    def unload(name: str):
        service.unload(name)
        return {"unloaded": name}

    return app


async def disconnected(request):
    """Returns when the client has gone (the body is read by then: the server's next message is the
    disconnect, or the end of the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def resolve_under(root, relative):
    """The directory `relative` names under root, or ServeError: no path from a request reaches the file
    system outside root (absolute paths, '..', symbolic links that lead out are refused)."""
    root = Path(root).resolve()
    if not relative or "\0" in relative or Path(relative).is_absolute():
        raise ServeError(403, f"path {relative[:200]!r}: give a directory relative to the adapters directory")
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ServeError(403, f"path {relative[:200]!r} leads outside the adapters directory")
    if not path.is_dir():
        raise ServeError(404, f"no directory {relative[:200]!r} in the adapters directory")
    return path


# --------------------------------------------------------------------------- run.py serve

def start_service(args):
    """The Service of `run.py serve`'s flags: the base model (--model, else the one the adapters name) and
    every --adapter loaded; UserError (exit 2) when one cannot be read or does not fit."""
    from machine import autocast_dtype, pick_device, seed_everything
    from predict import load_base, parse_adapters
    seed_everything(args.SR)
    device = pick_device(args.device)
    specs = parse_adapters(args.adapter or [])
    for name in specs:
        if not NAME.fullmatch(name):
            raise UserError(f"--adapter {name}=...: a name of letters, digits, '_', '-', '.' (at most 64), please.")
    adapters = {name: read_adapter(path) for name, path in specs.items() if not is_student_dir(path)}
    if args.adapters_dir is not None and not Path(args.adapters_dir).is_dir():
        raise UserError(f"--adapters-dir {args.adapters_dir}: no such directory.")
    if adapters or args.model:
        base = load_base(adapters, args, device)
        model, tok, info = base["model"], base["tok"], base["info"]
        base_name = args.model or next(a[2].get("model") or a[0].get("base_model_name_or_path")
                                       for a in adapters.values())
    elif not specs:
        raise UserError("nothing to serve: give --adapter [NAME=]DIR (repeatable), or --model with --adapters-dir "
                        "to load adapters at runtime.")
    else:
        model = tok = info = base_name = None
    service = Service(model, tok, info, str(base_name) if base_name else None, device,
                      autocast_dtype(args.precision, device))
    for name, path in specs.items():
        try:
            service.load(name, path, args.tokenizer)
        except UserError as e:
            raise UserError(f"--adapter {name}={path}: {e}") from None
    return service


def check_port(host, port):
    """Refuse a port that is taken now, before minutes of loading; uvicorn's own failure would come after."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): the port is in use or the address "
                        f"is not this machine's; pick another --port or --host.") from None


def serve(args):
    import uvicorn
    check_port(args.host, args.port)
    service = start_service(args)
    batcher = Batcher(service, args.batch_window / 1000, args.max_batch)
    app = build_app(service, batcher, args.adapters_dir, args.max_batch)
    print(f"serving {len(service.loaded)} adapters/students ({', '.join(sorted(service.loaded)) or 'none'}) "
          f"on base {service.base_name} at http://{args.host}:{args.port} (API at /docs); batches of up to "
          f"{args.max_batch} rows, window {args.batch_window:g} ms", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=False))
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits when it cannot bind after all (taken since check_port)
        if e.code:
            raise UserError(f"cannot listen on {args.host}:{args.port}: the port was taken meanwhile; pick another "
                            f"--port.") from None
        raise
