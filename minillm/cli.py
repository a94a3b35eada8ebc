"""The `minillm` command line: thin Click commands that parse flags and call library functions."""

import sys

import click

from minillm import __version__
from minillm.models import ARCHITECTURES


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 1."""


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
@click.option("--vocab-size", type=int, required=True, help="Vocabulary size, special tokens included.")
@click.option("--out", required=True, type=click.Path(), help="Where to write the tokenizer JSON.")
@click.option("--min-frequency", type=int, default=2, show_default=True,
              help="Stop merging when the best pair occurs fewer times.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def tokenizer_train(file, vocab_size, out, min_frequency, quiet):
    """Learn BPE merges from the UTF-8 text FILE and write the tokenizer to --out."""
    from minillm.tokenizer import Tokenizer, read_text_file

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
    """An architecture-specific option (a key some model declares in OPTIONS, beyond the shared ones) given
    for another architecture is one error line naming the flags."""
    from minillm import models

    flag = {p.name: p.opts[0] for p in click.get_current_context().command.params}
    for arch in ARCHITECTURES:
        own = [k for k in models.get_model(arch).OPTIONS if k not in models.BASE_DEFAULTS]
        if arch != config["arch"] and any(config.get(k) is not None for k in own):
            theirs = set(models.get_model(config["arch"]).OPTIONS)
            if not all(k in theirs for k in own if config.get(k) is not None):
                raise UserError(f"{'/'.join(flag[k] for k in own)} only apply to --arch {arch}")


def loop_options(steps, lr, warmup, eval_every, out="out"):
    """The flags of the training loop that `train` and `finetune` share (with per-command defaults)."""
    flags = [
        click.option("--steps", type=click.IntRange(1), default=steps, show_default=True),
        click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=lr, show_default=True,
                     help="Peak learning rate (warmup, then cosine decay to 10%)."),
        click.option("--warmup", type=click.IntRange(0), default=warmup, show_default=True),
        click.option("--weight-decay", type=click.FloatRange(0), default=0.1, show_default=True),
        click.option("--grad-clip", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=int, default=1337, show_default=True),
        click.option("--eval-every", type=click.IntRange(1), default=eval_every, show_default=True),
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


def make_options(steps, batch_size, lr, warmup, weight_decay, grad_clip, seed, eval_every, out, quiet,
                 resume=False):
    from minillm.train import TrainOptions

    return TrainOptions(steps=steps, batch_size=batch_size, lr=lr, warmup=min(warmup, steps),
                        weight_decay=weight_decay, grad_clip=grad_clip, seed=seed, eval_every=eval_every,
                        out=out, resume=resume, progress=not quiet)


def log(message):
    click.echo(message, err=True)


@cli.command()
@click.argument("file", type=click.Path())
@click.option("--arch", type=ARCH_CHOICES, default="gpt", show_default=True, help="Model architecture.")
@click.option("--context", type=click.IntRange(1), default=None, help="Sequence length [64].")
@click.option("--layers", "n_layer", type=click.IntRange(1), default=None, help="Number of blocks [4].")
@click.option("--heads", "n_head", type=click.IntRange(1), default=None, help="Attention heads [4].")
@click.option("--d-model", type=click.IntRange(1), default=None, help="Model width [128].")
@click.option("--vocab-size", type=click.IntRange(1), default=None, help="BPE vocabulary incl. specials [2048].")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(), default=None,
              help="Reuse this tokenizer.json instead of training a BPE on FILE; 'char': one token per "
                   "character of FILE.")
@documents_option
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, help="[float32]")
@click.option("--ternary", is_flag=True, default=None, help="BitNet b1.58 ternary weights in every block linear.")
@click.option("--experts", "n_experts", type=click.IntRange(1), default=None, help="moe: experts per layer [8].")
@click.option("--top-k", "top_k", type=click.IntRange(1), default=None, help="moe: experts per token [2].")
@click.option("--aux-loss-coef", type=click.FloatRange(0), default=None, help="moe: load-balancing loss weight.")
@click.option("--d-state", type=click.IntRange(1), default=None, help="mamba: SSM state size [16].")
@click.option("--d-conv", type=click.IntRange(1), default=None, help="mamba: conv kernel width [4].")
@click.option("--expand", type=click.IntRange(1), default=None, help="mamba: inner width factor [2].")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: CuPy arrays and numba.cuda kernels on an NVIDIA GPU (pip install \"minillm[cuda]\").")
@loop_options(steps=1500, lr=3e-3, warmup=100, eval_every=250)
def train(file, tokenizer_path, documents, resume, device, steps, batch_size, lr, warmup, weight_decay, grad_clip, seed,
          eval_every, out, quiet, **config):
    """Train a language model on FILE (one document per line, or --documents file), writing a checkpoint
    to --out."""
    from minillm.train import train as run

    _check_arch_options(config)
    opts = make_options(steps, batch_size, lr, warmup, weight_decay, grad_clip, seed, eval_every, out, quiet,
                        resume)
    opts.device = device
    opts.documents = documents
    run(file, opts, config, tokenizer_path=tokenizer_path, log=log)


@cli.command()
@click.argument("base", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--lora-rank", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lora-alpha", type=click.FloatRange(0, min_open=True), default=None, help="Scale numerator: the update is (alpha / rank) x A B [rank].")
@click.option("--lora-targets", multiple=True,
              help="Dense layers to adapt: name patterns (fnmatch, 're:<regex>' or 'all'); default: attention.")
@documents_option
@loop_options(steps=300, lr=1e-3, warmup=20, eval_every=100, out="out-lora")
def finetune(base, file, lora_rank, lora_alpha, lora_targets, documents, steps, batch_size, lr, warmup, weight_decay,
             grad_clip, seed, eval_every, out, quiet):
    """Fine-tune LoRA adapters on FILE on top of the checkpoint BASE; writes an adapter to --out."""
    from minillm import finetune as ft

    opts = make_options(steps, batch_size, lr, warmup, weight_decay, grad_clip, seed, eval_every, out, quiet)
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
@click.option("-n", "num", type=click.IntRange(1), default=10, show_default=True, help="How many samples.")
@click.option("--prompt", default="", help="Text every sample starts with.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.8, show_default=True)
@click.option("--top-k", type=click.IntRange(1), default=None)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def sample(checkpoint, adapter, num, prompt, max_tokens, temperature, top_k, top_p, seed, device):
    """Print -n samples from a trained checkpoint, one per line."""
    from minillm.generate import sample_lines

    for line in sample_lines(checkpoint, num, prompt, max_tokens, temperature, top_k, top_p, seed,
                             adapter=adapter, device=device):
        click.echo(line)
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
    """Entry point: run the CLI, turning expected failures into one clear line and a non-zero exit."""
    try:
        cli.main(args=argv, prog_name="minillm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (UserError, ValueError, OSError, UnicodeDecodeError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
