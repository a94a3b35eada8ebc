"""The `minillm` command line: thin Click commands that parse flags and call library functions."""

import math
import os
import sys

import click

from minillm import __version__
from minillm.errors import Interrupted
from minillm.models import ARCHITECTURES


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 1."""


class Finite(click.FloatRange):
    """click.FloatRange that also refuses NaN and +-inf (FloatRange lets NaN through every bound)."""
    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


SEED = click.IntRange(0, 2**63 - 1)


@click.group()
@click.version_option(__version__, prog_name="minillm")
def cli():
    """Train, sample and check small language models written from scratch in NumPy/Numba."""


# --- tokenizer commands ---
@cli.group("tokenizer")
def tokenizer_group():
    """Train a byte-level BPE tokenizer; encode and decode with one."""


def _text_arg(text):
    """TEXT itself, or standard input when TEXT is '-' or missing."""
    return sys.stdin.read() if text in (None, "-") else text


@tokenizer_group.command("train")
@click.argument("file", type=click.Path())
@click.option("--vocab-size", type=click.IntRange(1), required=True,
              help="Vocabulary size, special tokens included.")
@click.option("--out", required=True, type=click.Path(),
              help="Where to write the tokenizer (Hugging Face tokenizer.json format).")
@click.option("--min-frequency", type=int, default=2, show_default=True,
              help="Stop merging when the best pair occurs fewer times.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def tokenizer_train(file, vocab_size, out, min_frequency, quiet):
    """Learn BPE merges from the UTF-8 text FILE and write the tokenizer to --out."""
    from minillm import store
    from minillm.tokenizer import Tokenizer, read_text_file

    store.refuse_overwrite(out, {"the training text": file})
    text = read_text_file(file)
    tok = Tokenizer.train(text, vocab_size, progress=not quiet, min_frequency=min_frequency)
    tok.save(out)
    note = "" if tok.vocab_size == vocab_size else " (the text has no more frequent pairs)"
    click.echo(f"wrote {out}: {tok.vocab_size} tokens{note}", err=True)


@tokenizer_group.command("encode")
@click.option("--tokenizer", "path", required=True, type=click.Path(), help="Tokenizer JSON file.")
@click.option("--allow-special", is_flag=True, help="Read special-token text such as <|endoftext|> "
              "as the special token (default: as plain text).")
@click.argument("text", required=False)
def tokenizer_encode(path, allow_special, text):
    """Print the token ids of TEXT (or of standard input with '-' or no TEXT), space-separated."""
    from minillm.char_tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    ids = tok.encode(_text_arg(text), allowed_special="all" if allow_special else ())
    click.echo(" ".join(map(str, ids)))


@tokenizer_group.command("decode")
@click.option("--tokenizer", "path", required=True, type=click.Path(), help="Tokenizer JSON file.")
@click.argument("ids", nargs=-1)
def tokenizer_decode(path, ids):
    """Print the text of the token IDS (or of the ids read from standard input with '-' or none)."""
    from minillm.char_tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    words = _text_arg(None).split() if ids in ((), ("-",)) else ids
    try:
        values = [int(w) for w in words]
    except ValueError:
        bad = next(w for w in words if not w.lstrip("-").isdigit())
        raise UserError(f"not a token id: {bad!r}") from None
    click.echo(tok.decode(values), nl=False)
# --- end tokenizer commands ---

# --- train and sample ---
ARCH_CHOICES = click.Choice(list(ARCHITECTURES))


def _check_arch_options(config):
    """An option that some models declare in OPTIONS and the chosen one does not (e.g. --heads for mamba,
    --experts for gpt) is one error line naming the flags and the architectures they apply to."""
    from minillm import models

    flag = {p.name: p.opts[0] for p in click.get_current_context().command.params}
    declared = {arch: set(models.get_model(arch).OPTIONS) for arch in ARCHITECTURES}
    own = declared[config["arch"]]
    given = [k for k in sorted((set().union(*declared.values()) - own) & set(flag), key=list(flag).index)
             if config.get(k) is not None]
    if given:
        archs = [a for a in ARCHITECTURES if any(k in declared[a] for k in given)]
        raise UserError(f"{'/'.join(flag[k] for k in given)} only apply to --arch {' or '.join(archs)}")


def loop_options(steps, lr, warmup, eval_every, out="out"):
    """The flags of the training loop that `train` and `finetune` share (with per-command defaults)."""
    flags = [
        click.option("--steps", type=click.IntRange(1), default=steps, show_default=True,
                     help="Optimizer steps in all (with --resume: the run's total; larger extends it)."),
        click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
                     help="Sequences per step."),
        click.option("--lr", type=Finite(0, min_open=True), default=lr, show_default=True,
                     help="Peak learning rate (warmup, then cosine decay to 10%)."),
        click.option("--warmup", type=click.IntRange(0), default=warmup, show_default=True,
                     help="Steps of linear learning-rate warmup."),
        click.option("--weight-decay", type=Finite(0), default=0.1, show_default=True,
                     help="Decoupled (AdamW) weight decay of the dense-layer matrices."),
        click.option("--grad-clip", type=Finite(0, min_open=True), default=1.0, show_default=True,
                     help="Clip the global gradient norm to this."),
        click.option("--seed", type=SEED, default=1337, show_default=True,
                     help="Seed of the initialisation and the batches (same seed, same run)."),
        click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True,
                     help="Micro-batches of --batch-size per optimizer step, gradients averaged (per process "
                          "under mpiexec: the global batch is processes x this x --batch-size)."),
        click.option("--eval-every", type=click.IntRange(1), default=eval_every, show_default=True,
                     help="Evaluate (and save a checkpoint) every this many steps."),
        click.option("--out", default=out, show_default=True, help="Output directory."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]

    def decorate(f):
        for flag in reversed(flags):
            f = flag(f)
        return f

    return decorate


documents_option = click.option(
    "--documents", type=click.Choice(["lines", "file"]), default="lines", show_default=True,
    help="lines: every non-empty line is a document; file: the whole file is one document (newlines kept).")


def make_options(steps, batch_size, lr, warmup, weight_decay, grad_clip, seed, grad_accum, eval_every, out, quiet,
                 resume=False):
    from minillm.train import TrainOptions

    return TrainOptions(steps=steps, batch_size=batch_size, lr=lr, warmup=min(warmup, steps),
                        weight_decay=weight_decay, grad_clip=grad_clip, seed=seed, grad_accum=grad_accum,
                        eval_every=eval_every, out=out, resume=resume, progress=not quiet)


def log(message):
    click.echo(message, err=True)


@cli.command()
@click.argument("file", type=click.Path())
@click.option("--arch", type=ARCH_CHOICES, default="gpt", show_default=True, help="Model architecture.")
@click.option("--context", type=click.IntRange(1), default=None, show_default="64", help="Sequence length.")
@click.option("--layers", "n_layer", type=click.IntRange(1), default=None, show_default="4", help="Number of blocks.")
@click.option("--heads", "n_head", type=click.IntRange(1), default=None, show_default="4",
              help="gpt, moe: attention heads.")
@click.option("--d-model", type=click.IntRange(1), default=None, show_default="128", help="Model width.")
@click.option("--vocab-size", type=click.IntRange(1), default=None, show_default="2048",
              help="BPE vocabulary incl. specials (with --tokenizer: taken from it).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(), default=None,
              help="Reuse this tokenizer.json instead of training a BPE on FILE; 'char': one token per "
                   "character of FILE.")
@documents_option
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, show_default="float32",
              help="Parameter dtype.")
@click.option("--ternary", is_flag=True, default=None, help="BitNet b1.58 ternary weights in every block linear.")
@click.option("--kv-heads", "n_kv_head", type=click.IntRange(1), default=None, show_default="--heads",
              help="llama, mixtral: key/value heads, dividing --heads (1: multi-query).")
@click.option("--rope-theta", type=Finite(0, min_open=True), default=None, show_default="10000; mixtral 1e6",
              help="llama, mixtral: rotary base.")
@click.option("--sliding-window", type=click.IntRange(1), default=None, show_default="none",
              help="llama, mixtral: attend to the last N positions only (Mistral).")
@click.option("--tie-embeddings", is_flag=True, default=None, help="llama, mixtral: the head is embed_tokens.")
@click.option("--experts", "n_experts", type=click.IntRange(1), default=None, show_default="8",
              help="moe, mixtral: experts per layer.")
@click.option("--experts-per-token", "top_k", type=click.IntRange(1), default=None, show_default="2",
              help="moe, mixtral: experts each token is routed to (top-k).")
@click.option("--aux-loss-coef", type=Finite(0), default=None, show_default="0.01; mixtral 0.02",
              help="moe, mixtral: load-balancing loss weight.")
@click.option("--d-state", type=click.IntRange(1), default=None, show_default="16", help="mamba: SSM state size.")
@click.option("--d-conv", type=click.IntRange(1), default=None, show_default="4", help="mamba: conv kernel width.")
@click.option("--expand", type=click.IntRange(1), default=None, show_default="2", help="mamba: inner width factor.")
@click.option("--resume", is_flag=True,
              help="Continue the run saved in --out: its architecture, sizes and schedule come from the checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in --out (instead of refusing).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: CuPy arrays and numba.cuda kernels on an NVIDIA GPU (pip install \"minillm[cuda]\").")
@loop_options(steps=1550, lr=3e-3, warmup=100, eval_every=250)
def train(file, tokenizer_path, documents, resume, overwrite, device, steps, batch_size, lr, warmup, weight_decay,
          grad_clip, seed, grad_accum, eval_every, out, quiet, **config):
    """Train a language model on FILE (one document per line, or --documents file), writing a checkpoint
    to --out. Ctrl-C saves the checkpoint of the last whole step and stops (exit status 130).
    Data parallel: `mpiexec -n N minillm train FILE ...` (pip install "minillm[mpi]"; see the README)."""
    from minillm.train import train as run

    _check_arch_options(config)
    if resume and overwrite:
        raise UserError("--resume continues the checkpoint in --out, --overwrite replaces it: choose one")
    explicit = _given_options()
    if "arch" not in explicit:
        config["arch"] = None                      # --resume takes it from the checkpoint; else gpt
    opts = make_options(steps, batch_size, lr, warmup, weight_decay, grad_clip, seed, grad_accum, eval_every, out,
                        quiet, resume)
    opts.device, opts.overwrite, opts.explicit = device, overwrite, explicit
    opts.documents = documents
    run(file, opts, config, tokenizer_path=tokenizer_path, log=log)


def _given_options():
    """The names of the options given on the command line (or by environment), not left at their default."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return frozenset(name for name in ctx.params
                     if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT))


@cli.command()
@click.argument("base", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--lora-rank", type=click.IntRange(1), default=8, show_default=True, help="Rank r of the adapters.")
@click.option("--lora-alpha", type=Finite(0, min_open=True), default=None, show_default="rank",
              help="Scale numerator: the update is (alpha / rank) x A B.")
@click.option("--lora-targets", multiple=True, show_default="the model's LORA_TARGETS (attention projections)",
              help="Dense layers to adapt: name patterns (fnmatch, 're:<regex>' or 'all').")
@documents_option
@loop_options(steps=300, lr=1e-3, warmup=20, eval_every=100, out="out-lora")
def finetune(base, file, lora_rank, lora_alpha, lora_targets, documents, steps, batch_size, lr, warmup, weight_decay,
             grad_clip, seed, grad_accum, eval_every, out, quiet):
    """Fine-tune LoRA adapters on FILE on top of the checkpoint BASE; writes an adapter to --out
    (data parallel under `mpiexec -n N`, as train)."""
    from minillm import finetune as ft

    opts = make_options(steps, batch_size, lr, warmup, weight_decay, grad_clip, seed, grad_accum, eval_every, out,
                        quiet)
    opts.documents = documents
    ft.finetune(base, file, opts, rank=lora_rank, alpha=lora_alpha,
                targets=",".join(lora_targets) or None, log=log)


@cli.command()
@click.argument("base", type=click.Path())
@click.argument("adapter", type=click.Path())
@click.option("--out", required=True, help="Where to write the merged checkpoint.")
def merge(base, adapter, out):
    """Fold the LoRA ADAPTER into its BASE checkpoint and write a plain checkpoint."""
    from minillm import finetune as ft

    ft.merge_checkpoint(base, adapter, out)
    log(f"merged checkpoint written to {out}/")


@cli.command()
@click.option("--checkpoint", default="out", show_default=True, help="Checkpoint directory.")
@click.option("--adapter", default=None, help="A LoRA adapter directory to apply to the checkpoint.")
@click.option("-n", "--num-samples", "num", type=click.IntRange(1), default=10, show_default=True,
              help="How many samples.")
@click.option("--prompt", default="", help="Text every sample starts with.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True,
              help="New tokens per sample at most. A model with learned positions (gpt, moe) slides its "
                   "window past its context: the last context/2 tokens are read again and it goes on.")
@click.option("--temperature", type=Finite(0), default=0.8, show_default=True,
              help="Divide the logits by this; 0 is greedy.")
@click.option("--greedy", is_flag=True, help="Always the most likely token (the same as --temperature 0).")
@click.option("--top-k", type=click.IntRange(1), default=None, help="Keep the k most likely tokens (ties kept).")
@click.option("--top-p", type=Finite(0, 1, min_open=True), default=None,
              help="Keep the most likely tokens up to this probability mass.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="The same seed gives the same samples.")
@click.option("--stream/--no-stream", default=None,
              help="Print the tokens as they come [default: on for -n 1 on a terminal].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: CuPy arrays and numba.cuda kernels on an NVIDIA GPU.")
def sample(checkpoint, adapter, num, prompt, max_tokens, temperature, greedy, top_k, top_p, seed, stream, device):
    """Print samples from a trained checkpoint, one per line (control characters escaped)."""
    from minillm.generate import sample_lines

    if stream is None:
        stream = num == 1 and sys.stdout.isatty()
    if stream and num != 1:
        raise UserError("--stream prints one sample: use -n 1")
    write = (lambda text: click.echo(text, nl=False)) if stream else None
    lines = sample_lines(checkpoint, num, prompt, max_tokens, 0.0 if greedy else temperature, top_k, top_p,
                         seed, adapter=adapter, device=device, stream=write)
    if stream:
        click.echo()
        return
    for line in lines:
        click.echo(line)


@cli.command("eval")
@click.option("--checkpoint", default="out", show_default=True, help="Checkpoint directory.")
@click.option("--adapter", default=None, help="A LoRA adapter directory to apply to the checkpoint.")
@click.argument("file", type=click.Path())
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Windows per forward.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: CuPy arrays and numba.cuda kernels on an NVIDIA GPU.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(checkpoint, adapter, file, batch_size, device, quiet):
    """Loss of a checkpoint on FILE (one document per line): nats/token, perplexity, bits/byte."""
    from minillm.evaluate import evaluate_file

    result = evaluate_file(checkpoint, file, adapter=adapter, batch_size=batch_size, progress=not quiet,
                           device=device)
    click.echo(result.summary())


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", default=None, help="The PNG to write [default: RUN/loss.png of the first run].")
@click.option("--title", default=None, help="The figure's title.")
def plot(runs, out, title):
    """Plot training and validation loss (and the learning rate) of one or several training runs."""
    from minillm.plot import plot_runs

    out = out or os.path.join(runs[0], "loss.png")
    click.echo(f"wrote {plot_runs(runs, out, title)}", err=True)


# --- end train and sample ---


# --- reference commands ---
@cli.group("reference")
def reference_group():
    """Golden cases (inputs, params, outputs, gradients) to check other implementations against."""


def _component_list(values):
    """--components given once with commas or several times -> list, or None for all."""
    names = [n for v in values for n in v.replace(",", " ").split()]
    return names or None


@reference_group.command("make")
@click.argument("directory", type=click.Path())
@click.option("--components", multiple=True, help="Components to write (comma-separated; default: all).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
def reference_make(directory, components, seed):
    """Write one safetensors file per component and manifest.json into DIRECTORY."""
    from minillm import reference

    manifest = reference.make(directory, _component_list(components), seed, log=log)
    log(f"{len(manifest['components'])} components written to {directory}/")


@reference_group.command("check")
@click.argument("directory", type=click.Path())
@click.option("--impl", required=True, help="package.module:function, or package.module (or file.py) "
              "with functions named like the components.")
@click.option("--components", multiple=True, help="Components to check (comma-separated; default: every "
              "one the implementation has a function for).")
@click.option("--variant", type=click.Choice(["all", "float64", "float32"]), default="all", show_default=True)
@click.option("--forward-only", is_flag=True, help="Compare outputs only, not gradients.")
@click.option("--quiet", is_flag=True, help="Print only failures and the summary.")
def reference_check(directory, impl, components, variant, forward_only, quiet):
    """Run the implementation on the golden inputs in DIRECTORY; print errors per tensor.

    Exit status 1 when any tensor is off by more than the manifest's tolerance."""
    from minillm import reference

    show = None if quiet else (lambda name, rep: click.echo(rep.format()))
    result = reference.check_directory(directory, impl, _component_list(components), variant, forward_only,
                                       on_report=show)
    for line in result.failures:
        click.echo(line)
    if not result.ok:
        raise UserError(result.summary())
    click.echo(result.summary())


@reference_group.command("list")
def reference_list():
    """Print the components, the peer each matches, and their math."""
    from minillm.reference.cases import COMPONENTS

    for name, spec in COMPONENTS.items():
        click.echo(f"{name}  ({', '.join(spec['variants'])})\n  matches: {spec['matches']}\n  math: {spec['math']}")
# --- end reference commands ---

# --- quantize commands ---
@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, help="Where to write the packed inference checkpoint.")
def quantize(checkpoint, out):
    """Pack a checkpoint trained with --ternary into 2 bits per weight (sample runs from it directly)."""
    from minillm.quantize import quantize_checkpoint

    before, after = quantize_checkpoint(checkpoint, out)
    log(f"packed checkpoint written to {out}/: model.safetensors {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB "
        f"({before / after:.1f}x smaller)")
# --- end quantize commands ---


def main(argv=None):
    """Entry point: run the CLI, turning expected failures into one clear line and a non-zero exit.

    Under MPI (minillm.distributed) an error every rank has is printed once, by rank 0; an error of one rank
    is printed as `error: rank R: ...` and ends the whole job (MPI_Abort) instead of leaving the others waiting."""
    from minillm import distributed

    try:
        cli.main(args=argv, prog_name="minillm", standalone_mode=False)
    except click.exceptions.Abort:
        distributed.exit_on_error(None, "aborted", 130)
    except click.ClickException as e:
        if distributed.is_root():
            e.show()
        sys.exit(e.exit_code)
    except (UserError, ValueError, OSError, UnicodeDecodeError) as e:
        distributed.exit_on_error(e, f"error: {e}", 1)
    except MemoryError as e:
        distributed.exit_on_error(e, f"error: out of memory{f' ({e})' if str(e) else ''}; use smaller sizes", 1)
    except Interrupted as e:          # Ctrl-C in training, after the checkpoint of the last step was saved
        distributed.exit_on_error(e, str(e), 130)
    except KeyboardInterrupt as e:
        distributed.exit_on_error(e, "interrupted", 130)
    except Exception as e:   # a bug: under MPI the other ranks must not wait for this one
        if not distributed.active():
            raise
        distributed.exit_on_error(e, f"error: {type(e).__name__}: {e}", 1, expected=False)
