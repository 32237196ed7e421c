# The `chatglm` command: thin subcommands over the library.
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

from .demo import DEMO_MODEL, demo_model_path


class UsageError(Exception):
    """A mistake in the command line, found after parsing (a device that is not there, an --out that would
    overwrite): reported like argparse's own errors."""


class Parser(argparse.ArgumentParser):
    """Every command-line error is one line, `chatglm: error: ...`, exit status 2 (argparse's default prints the
    usage first and names the subcommand's prog)."""

    def error(self, message):
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            near = difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'", m.group(2)), n=1)
            message += f"; did you mean {near[0]!r}?" if near else ""
        fail(f"{message} (see: {self.prog} --help)")


def fail(message: str):
    print(f"chatglm: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def chosen_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)subcommand's parser that parsed args: its options are the ones a misspelled flag meant."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return chosen_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def unknown_arguments(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """'unrecognized arguments: ...', with the nearest option for each misspelled flag."""
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    hints = []
    for arg in extras:
        flag = arg.split("=", 1)[0]
        near = difflib.get_close_matches(flag, options, n=1, cutoff=0.6) if flag.startswith("-") else []
        if near:
            hints.append((flag, near[0]))
    if len(hints) == 1:
        hint = f"; did you mean {hints[0][1]}?"
    else:
        hint = "; did you mean " + ", ".join(f"{b} for {a}" for a, b in hints) + "?" if hints else ""
    return f"unrecognized arguments: {' '.join(extras)}{hint} (see: {parser.prog} --help)"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts and lengths, where 0 or less has no meaning)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def client_counts(text: str) -> list[int]:
    """argparse type for --clients: comma-separated positive integers."""
    return sorted({positive_int(c.strip()) for c in text.split(",")})


def add_model_args(p: argparse.ArgumentParser, optional: bool = True):
    if optional:
        p.add_argument("model", nargs="?", help="checkpoint folder or hub id (default: the bundled demo model)")
    else:
        p.add_argument("model", help="checkpoint folder or hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, the checkpoint's dtype on GPUs")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch and the kernels (default: 1 for models under 64M parameters, "
                        "else one per core)")


def add_sampling_args(p: argparse.ArgumentParser):
    """Options left out take the model's sampling_defaults: its generation_config.json (the demo model's says
    greedy), else the family's sampling settings."""
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--greedy", action="store_true", help="greedy decoding")
    how.add_argument("--sample", action="store_true", help="sampling")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="prompt + answer tokens (default: the family's)")


def check_device(name: str):
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU was found"
            raise UsageError(f"--device {name}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: not supported (cpu, cuda, cuda:N, mps)")


SMALL_MODEL = 64_000_000  # parameters


def default_threads(args) -> int | None:
    """--threads left out: one thread for a small model outside the server, whose products are too small to gain
    from a second (and where each parallel region waits for its slowest thread, which on a busy machine is one the
    scheduler set aside: decode ran 10-20x slower); else torch's default, one per core."""
    from . import checkpoint
    if not hasattr(args, "model") or getattr(args, "random", False):
        return None
    if getattr(getattr(args, "func", None), "__name__", "") == "cmd_serve":
        return None  # the server batches rows, and a batch of 8 gains from a second thread (1.6x on the demo model)
    try:
        cfg = checkpoint.load_config(checkpoint.resolve(args.model or demo_model_path()))
    except (ValueError, OSError):
        return None  # the command itself reports it
    return 1 if 2 * checkpoint.min_weight_bytes(cfg) < SMALL_MODEL else None


def set_threads(n: int | None):
    """--threads: torch's intra-op threads and the C kernels' (for this thread; see README 'Busy machines')."""
    if n is None:
        return
    import torch

    from . import kernels
    torch.set_num_threads(n)
    lib = kernels.library()
    if lib is not None:
        lib.cg_set_num_threads(n)


def load_model(args):
    from . import checkpoint
    from .auto import AutoModel, AutoTokenizer
    from .chat.formats import chat_format
    path = args.model or demo_model_path()
    device = args.device or "cpu"
    check_device(device)
    if getattr(args, "system", None):  # checked on config.json, before the weights load
        folder = checkpoint.resolve(path)
        family = checkpoint.detect_family(folder, checkpoint.read_json(folder / "config.json", " (is this a "
                                                                       "checkpoint folder?)"))
        if not chat_format(family).has_system:
            raise UsageError(f"--system needs a ChatGLM3 model; {path} is {family}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=args.dtype, device=device)
    return tokenizer, model


def sampling_kwargs(args) -> dict:
    kw = dict(do_sample=False if args.greedy else True if args.sample else None, temperature=args.temperature,
              top_p=args.top_p, seed=args.seed)
    kw.update({k: getattr(args, k) for k in ("top_k", "repetition_penalty") if getattr(args, k) is not None})
    if args.max_length is not None:
        kw["max_length"] = args.max_length
    return kw


def stream_answer(model, tokenizer, query, history, out, **kw):
    """Print the answer as it streams; returns (response, history). Ctrl-C stops this answer only. Text that
    post-processing may still change is held back until it settles (chat.stream.HoldBack)."""
    from .chat.stream import HoldBack
    hold, response, new_history = HoldBack(unstable=model.format.unstable_tail), "", None
    try:
        for response, new_history in model.stream_chat(tokenizer, query, history=history, **kw):
            if isinstance(response, str):
                out.write(hold.feed(response))
                out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
        if new_history is None:
            out.write("\n")
            return None, history
    if isinstance(response, str):
        rest = hold.feed(response, final=True)
        out.write(rest if hold.sent == response else "\n" + response)
    else:
        out.write(json.dumps(response, ensure_ascii=False))
    out.write("\n")
    out.flush()
    return response, new_history


NOT_UTF8 = "(the input was not valid UTF-8: each invalid byte became U+FFFD, the replacement character)"


def utf8_text(text: str, out) -> str:
    """Text from argv or stdin with invalid UTF-8 bytes replaced by U+FFFD, saying so on `out` (Python decodes
    those bytes to lone surrogates, which no tokenizer takes)."""
    from .tokenizer import valid_text
    clean = valid_text(text)
    if clean != text:
        print(NOT_UTF8, file=out)
    return clean


def load_tools(path: str):
    """--tools FILE.py: every public function the file defines, as a ToolRegistry."""
    import importlib.util

    from .chat.tools import ToolRegistry
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--tools {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"chatglm_user_tools_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise UsageError(f"--tools {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # the user's module: any failure, SystemExit included, is its error
        raise UsageError(f"--tools {path}: the module failed to import: {type(e).__name__}: {e}") from None
    try:
        return ToolRegistry.from_module(module)
    except ValueError as e:
        raise UsageError(f"--tools {path}: {e}") from None


class AgentConsole:
    """Shows one agent turn: answer text as it streams; tool calls, observations, code and results on lines of
    their own, each marked ([tool call], [observation], [code] ... [/code], [result], [image] PATH)."""

    def __init__(self, interactive: bool, confirm: bool, read_line):
        self.interactive, self.ask, self.read_line = interactive, confirm, read_line
        self.out = self.log = sys.stdout
        self.image_dir = None

    def show(self, event):
        from .chat import agent
        if isinstance(event, agent.TextDelta):
            self.out.write(event.text)
        elif isinstance(event, agent.ToolCall):
            args = "could not be read" if event.arguments is None else json.dumps(event.arguments, ensure_ascii=False)
            self.log.write(f"\n[tool call] {event.name} {args}\n")
        elif isinstance(event, agent.Observation):
            self.log.write(f"[observation{' (error)' * event.error}] {event.text}\n")
        elif isinstance(event, agent.InterpreterCode):
            self.log.write(f"\n[code]\n{event.code.rstrip()}\n[/code]\n")
        elif isinstance(event, agent.InterpreterResult):
            self.log.write(f"[result{' (error)' * event.error}] {event.text}\n")
            for path in self.save_images(event.images):
                self.log.write(f"[image] {path}\n")
        self.out.flush()
        self.log.flush()

    def save_images(self, images) -> list[str]:
        import tempfile
        if images and self.image_dir is None:
            self.image_dir = Path(tempfile.mkdtemp(prefix="chatglm-images-"))
        paths = []
        for png in images:
            path = self.image_dir / f"figure-{len(list(self.image_dir.iterdir())) + 1}.png"
            path.write_bytes(png)
            paths.append(str(path))
        return paths

    def confirm(self, event) -> bool:
        what = "this tool call" if type(event).__name__ == "ToolCall" else "this code"
        self.log.write(f"run {what}? [y/N] ")
        self.log.flush()
        answer = self.read_line()
        if not self.interactive:
            self.log.write(f"{answer}\n")
        return answer is not None and answer.strip().lower() in ("y", "yes")


def cmd_chat(args):
    """Interactive when stdin is a terminal; otherwise (scripted) one user message per line, no input prompt, each
    answer printed after 'ChatGLM: ' on a line of its own."""
    interactive = sys.stdin.isatty()
    registry = load_tools(args.tools) if args.tools else None
    tokenizer, model = load_model(args)
    if (registry is not None or args.interpreter) and not model.format.supports_tools:
        raise UsageError(f"--tools and --interpreter need a ChatGLM3 model; this one is {model.family}")
    interpreter = None
    if args.interpreter:
        from .chat.interpreter import CodeInterpreter, InterpreterUnavailable
        try:
            interpreter = CodeInterpreter()
        except InterpreterUnavailable as e:
            raise UsageError(f"--interpreter: {e}") from None
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte is reported, and the session goes on
    if args.system:
        args.system = utf8_text(args.system, sys.stdout)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    kw = sampling_kwargs(args)
    rounds = model.format.rounds
    name = "the bundled demo model" if not args.model else args.model
    extras = "".join([f", tools: {', '.join(registry.tools)}" if registry else "",
                      ", code interpreter" if interpreter else ""])
    print(f"chatglm: chatting with {name} ({model.family}{extras}). 'clear' resets the conversation, 'exit' "
          "leaves; Ctrl-C stops an answer.")

    def read_line(prompt=""):  # None at the end of the input
        if not interactive:
            line = sys.stdin.readline()
            return line.rstrip("\n") if line else None
        try:
            return input(prompt)
        except EOFError:
            return None

    console = AgentConsole(interactive, args.confirm, read_line)
    try:
        while True:
            try:
                query = read_line("\n用户 / You: ")
            except KeyboardInterrupt:
                print("\n(type 'exit' to leave)")
                continue
            if query is None:
                if interactive:
                    print()
                return 0
            query = utf8_text(query, sys.stdout)
            q = query.strip()
            if q in ("exit", "quit", "stop"):
                return 0
            if q == "clear":
                history = list(start)
                print("(conversation cleared)")
                continue
            if not q:
                continue
            print("ChatGLM: ", end="", flush=True)
            before = len(rounds(history)[1])
            try:
                if registry is None and interpreter is None:
                    _, new_history = stream_answer(model, tokenizer, query, history, sys.stdout, **kw)
                else:
                    new_history = agent_turn(model, tokenizer, query, history, registry, interpreter, console, kw)
            except ValueError as e:  # e.g. the message alone does not fit the context
                print(f"\nerror: {e}")
                continue
            if new_history is not None:
                dropped = before + 1 - len(rounds(new_history)[1])
                if dropped > 0:
                    print(f"(the {dropped} oldest round{'s' * (dropped > 1)} no longer fit the context and "
                          "were dropped)")
                history = new_history
    finally:
        if interpreter is not None:
            interpreter.close()


def agent_turn(model, tokenizer, query, history, registry, interpreter, console, kw):
    """One user turn through the tool / interpreter loop; returns the new history (None when stopped)."""
    from .chat import agent
    final = None
    try:
        for event in agent.stream(model, tokenizer, query, tools=registry, interpreter=interpreter, history=history,
                                  confirm=console.confirm if console.ask else None, **kw):
            if isinstance(event, agent.FinalAnswer):
                final = event
            else:
                console.show(event)
    except KeyboardInterrupt:
        console.out.write(" [stopped]\n")
        return None
    if final.finish_reason == "max_rounds":
        console.log.write(f"[stopped: the model was still calling tools after {final.rounds} rounds]\n")
    console.out.write("\n")
    console.out.flush()
    return final.history


def cmd_generate(args):
    tokenizer, model = load_model(args)
    args.prompt = utf8_text(args.prompt, sys.stderr)
    if args.system:
        args.system = utf8_text(args.system, sys.stderr)
    kw = sampling_kwargs(args)
    if args.raw:
        enc = tokenizer([args.prompt], return_tensors="pt")
        kw.pop("max_length", None)
        if kw["do_sample"] is None:  # the command samples unless the checkpoint says otherwise
            kw["do_sample"] = model.generation.get("do_sample", True)
        out = model.generate(enc["input_ids"], max_new_tokens=args.max_new_tokens, **kw)
        print(tokenizer.decode(out[0, enc["input_ids"].shape[1]:].tolist()))
        return 0
    history = [{"role": "system", "content": args.system}] if args.system else []
    stream_answer(model, tokenizer, args.prompt, history, sys.stdout, **kw)
    return 0


def cmd_bench(args):
    if args.serve:
        from .bench.serve import run_serve
        return run_serve(model=args.model, clients=args.clients, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, device=args.device, dtype=args.dtype,
                         quantization_bit=getattr(args, "quantization_bit", 0), json_out=args.json)
    from .bench.speed import report, run
    report(run(model=args.model, random=args.random, config=args.config, device=args.device, dtype=args.dtype,
               quantization_bit=args.quantization_bit, group_size=args.group_size, prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, batch=args.batch), args.json)
    return 0


CHECKPOINT_FILE = re.compile(r"config\.json|tokenizer_config\.json|tokenizer\.model|ice_text\.model|.*\.safetensors|"
                             r".*\.bin|.*\.index\.json")


def checkpoint_files_in(out: str, model: str, overwrite: bool) -> list[Path]:
    """--out names a new or empty folder, or one holding a checkpoint with --overwrite: that checkpoint's files
    are returned to be removed before saving, so no second tokenizer or stale shard stays beside the new one."""
    from . import checkpoint
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder (--out names a folder to save into)")
    if not folder.is_dir():
        return []
    if folder.resolve() == checkpoint.resolve(model).resolve():
        raise UsageError(f"--out {out}: is the folder of the model being quantized; choose another")
    old = sorted(f for f in folder.iterdir() if CHECKPOINT_FILE.fullmatch(f.name))
    if old and not overwrite:
        names = ", ".join(f.name for f in old[:3]) + (", ..." if len(old) > 3 else "")
        raise UsageError(f"--out {out}: already holds a checkpoint ({names}); pass --overwrite to replace it, or "
                         "choose a new folder")
    return old


def cmd_quantize(args):
    from .bench.accuracy import checkpoint_accuracy, random_accuracy
    bits_list = args.bits or ([4] if args.out else [8, 4])
    if args.out:
        if args.random or len(bits_list) != 1:
            raise UsageError("--out saves one checkpoint: give one --bits and a MODEL")
        from .auto import AutoModel, AutoTokenizer
        from .checkpoint import umask_mode
        path = args.model or demo_model_path()
        old = checkpoint_files_in(args.out, path, args.overwrite)
        model = AutoModel.from_pretrained(path, quantization_bit=bits_list[0],
                                          quantization_group_size=args.group_size)
        for f in old:  # only now that the new checkpoint is ready to be written
            f.unlink()
        model.save_pretrained(args.out)
        AutoTokenizer.from_pretrained(path).save_pretrained(args.out)
        for f in Path(args.out).iterdir():
            umask_mode(f)
        print(f"saved int{bits_list[0]} checkpoint to {args.out}" + (" (replacing the one there)" if old else ""))
    for bits in bits_list:
        if args.random:
            if not args.config:
                raise ValueError("--random needs --config CONFIG.json")
            r = random_accuracy(args.config, bits, args.group_size, args.layers)
            what = f"{args.config} (random weights{f', {args.layers} layers' if args.layers else ''})"
        else:
            r = checkpoint_accuracy(args.model or demo_model_path(), bits, args.group_size)
            what = args.model or "the demo model"
        g = f" group {args.group_size}" if args.group_size else ""
        print(f"int{bits}{g} vs unquantized, {what}: top-1 agreement {100 * r['top1_agreement']:.1f}%, "
              f"relative logit error {r['relative_logit_error']:.4f}")
    return 0


def cmd_serve(args):
    from .serve.app import serve
    return serve(model=args.model, device=args.device, dtype=args.dtype, quantization_bit=args.quantization_bit,
                 host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
                 max_queue=args.max_queue, allowed_hosts=args.allowed_hosts, aliases=args.alias,
                 log_prompts=args.log_prompts, tools=load_tools(args.tools) if args.tools else None,
                 interpreter=args.interpreter, max_kernels=args.max_kernels)


def add_train_args(p: argparse.ArgumentParser, cls):
    """A flag for every field of a chatglm.train config dataclass; flags left out stay None (the YAML or the
    field's default applies)."""
    import dataclasses
    p.add_argument("--config", default=None, help="a YAML file of options (flags override it)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).split("|")[0].strip()
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const=True, default=None,
                           help="continue from the latest checkpoint under --out, or from the one given")
        elif kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=None,
                           help="comma-separated" if kind == "tuple" else None)


def cmd_train(args):
    from .train.commands import run
    options = {k: v for k, v in vars(args).items() if k not in ("command", "train_command", "func", "config")}
    run(args.train_command, options, args.config)
    return 0


def main(argv=None) -> int:
    parser = Parser(prog="chatglm", description="Run ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="chat in the terminal (streaming, with history)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt (ChatGLM3)")
    p.add_argument("--tools", default=None, metavar="FILE.py",
                   help="ChatGLM3 tool calling with the public functions of this file (type hints required)")
    p.add_argument("--interpreter", action="store_true",
                   help="ChatGLM3 code interpreter: runs model-written code in a sandboxed Jupyter kernel")
    p.add_argument("--confirm", action="store_true", help="ask before each tool call or code cell runs")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="one answer to --prompt, then exit")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system prompt (ChatGLM3)")
    p.add_argument("--raw", action="store_true", help="continue the text as is, without the chat format")
    p.add_argument("--max-new-tokens", type=int, default=128, help="with --raw")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="load time, peak RSS, prefill and decode speed")
    add_model_args(p)
    p.add_argument("--random", action="store_true", help="random weights for --config (no checkpoint needed)")
    p.add_argument("--config", default=None, help="with --random: an official config.json")
    p.add_argument("--quantization-bit", type=int, default=0, choices=[0, 4, 8])
    p.add_argument("--group-size", type=int, default=None, help="group-wise scales (e.g. 128) instead of per row")
    p.add_argument("--prompt-len", type=positive_int, default=32)
    p.add_argument("--new-tokens", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.add_argument("--serve", action="store_true", help="benchmark the HTTP server with concurrent clients")
    p.add_argument("--clients", type=client_counts, default=[1, 8, 32],
                   help="with --serve: concurrency levels, comma-separated (default 1,8,32)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quantize", help="quantize a checkpoint to int8/int4, save it, report the accuracy")
    p.add_argument("model", nargs="?", help="checkpoint folder or hub id")
    p.add_argument("--bits", type=int, choices=[4, 8], action="append",
                   help="4 or 8 (repeat to compare both; default: both when only reporting)")
    p.add_argument("--group-size", type=int, default=None, help="group-wise scales (e.g. 128) instead of per row")
    p.add_argument("--out", default=None, help="save the quantized checkpoint (safetensors) into this new folder")
    p.add_argument("--overwrite", action="store_true", help="with --out: replace the checkpoint already there")
    p.add_argument("--random", action="store_true", help="report on random weights of --config instead")
    p.add_argument("--config", default=None, help="with --random: an official config.json")
    p.add_argument("--layers", type=positive_int, default=None, help="with --random: use fewer layers (memory)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--quantization-bit", type=int, default=0, choices=[0, 4, 8])
    p.add_argument("--allowed-hosts", type=lambda t: [h.strip() for h in t.split(",") if h.strip()], default=None,
                   help="Host names served, comma-separated ('*.example.com', '*' for any; default: the loopback "
                        "names for a loopback --host, any for 0.0.0.0)")
    p.add_argument("--alias", action="append", default=[], help="another model name requests may use (repeat)")
    p.add_argument("--log-prompts", action="store_true", help="put each request's prompt text in the access log")
    p.add_argument("--tools", default=None, metavar="FILE.py",
                   help="the web page's Tools mode offers this file's functions (default: the demo tools)")
    p.add_argument("--interpreter", action="store_true",
                   help="add the Code Interpreter mode: model-written code runs in a sandboxed kernel per conversation")
    p.add_argument("--max-kernels", type=positive_int, default=8, help="with --interpreter: live kernels at most")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="fine-tune: sft (full, lora, qlora, ptuning), reward, dpo, ppo")
    methods = p.add_subparsers(dest="train_command", required=True)
    from .train.commands import commands
    for name, (cls, _, what) in commands().items():
        add_train_args(methods.add_parser(name, help=what, description=what), cls)
    p.set_defaults(func=cmd_train)

    args, extras = parser.parse_known_args(argv)
    if extras:
        fail(unknown_arguments(chosen_parser(parser, args), extras))
    try:
        if hasattr(args, "threads"):
            set_threads(args.threads or default_threads(args))
        return args.func(args) or 0
    except (UsageError, ValueError, OSError) as e:  # bad input (files, values); a bug keeps its traceback
        fail(str(e))
    except KeyboardInterrupt:
        print("\nchatglm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
