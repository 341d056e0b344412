"""The bad-input catalogue: everything a user can hand keras-embed that it cannot use.

Every case runs through the command line as the console script does (click's CliRunner;
two of them also in a real process) and must: exit with its documented code (2 bad usage
or input, 3 verification failed, 4 unsupported model), print one line on stderr that
names the problem and the fix (`mentions` holds a word of each), print no traceback and
nothing on stdout, and leave its folder exactly as it was: the input files byte-identical,
nothing at the output path, no temporary or report file.

One table, `CATALOGUE`; each case runs under every command in its `commands`.
"""

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import hostile
import hostile_savedmodels
from hostile import device, fifo
from keras_embed.tools.cli import main
from model_files import OUTSIDE, build_tf_keras_models, data_from_outside

SAVED_MODELS = Path(__file__).resolve().parents[1] / "saved_models"
WIDENED = SAVED_MODELS / "digits_widened.keras"
INPUT = "<the input>"
MODEL_COMMANDS = ("prune", "embed", "analyze")
COMMANDS = {
    "prune": ("prune", "{model}", "-o", "{output}"),
    "embed": ("embed", "{model}", "-o", "{output}", "--widen", "0:0:0.3"),  # layer by index: fits every model here
    "analyze": ("analyze", "{model}"),
}


# ---------------------------------------------------------------- how the inputs are made


def copy_of(source):
    return lambda path: shutil.copyfile(source, path)


def raw(make_bytes):
    return lambda path: path.write_bytes(make_bytes())


def saved(make_layers, shape=(5,)):
    """A small Sequential model: an input of `shape`, `make_layers()`, then Dense(3)."""
    return lambda path: keras.Sequential([keras.Input(shape), *make_layers(), keras.layers.Dense(3)]).save(path)


def rezipped(edit_config=None, extra=(), drop=()):
    """The widened digits model with its config.json edited (a function of the parsed
    config, or returning text), members `extra` (name, bytes) added and `drop` left out."""

    def write(path):
        with zipfile.ZipFile(WIDENED) as source, zipfile.ZipFile(path, "w") as target:
            for info in source.infolist():
                content = source.read(info)
                if info.filename == "config.json" and edit_config is not None:
                    edited = edit_config(json.loads(content))
                    content = (edited if isinstance(edited, str) else json.dumps(edited)).encode()
                if info.filename not in drop:
                    target.writestr(info, content)
            for name, content in extra:
                target.writestr(name, content)

    return write


def first_dense(change):
    """A config edit applying `change` to the first Dense layer's entry."""

    def edit(config):
        change(config["config"]["layers"][1])
        return config

    return edit


def savedmodel_folder(path):
    path.mkdir()
    (path / "saved_model.pb").write_bytes(b"not a Keras model")


def wide_model(path):
    """1 input -> Dense(8192, relu) -> Dense(1): a Gram of 512 MiB, 25k parameters."""
    keras.Sequential([keras.Input((1,)), keras.layers.Dense(8192, activation="relu"), keras.layers.Dense(1)]).save(path)


def npy(make_array, name="data.npy"):
    return lambda folder: np.save(folder / name, make_array()) or folder / name


def npz(name="data.npz", **make_arrays):
    return lambda folder: np.savez(folder / name, **{key: make() for key, make in make_arrays.items()}) or folder / name


def file(name, content=None):
    """A data file holding `content` (None: the file does not exist)."""

    def write(folder):
        if content is not None:
            (folder / name).write_bytes(content)
        return folder / name

    return write


def written(make, name):
    """A data maker from a `hostile` maker of one file."""
    return lambda folder: make(folder / name) or folder / name


def pickled(folder):
    """A .npy of Python objects: loading it would unpickle."""
    np.save(folder / "data.npy", np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    return folder / "data.npy"


def symlink_to(name):
    return lambda path: os.symlink(name, path)


def weights_set(value):
    """The small model of `saved` (5 -> Dense(4, relu) -> Dense(3)) with every weight `value`."""

    def write(path):
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu", name="hidden"),
                                  keras.layers.Dense(3, name="logits")])
        model.set_weights([np.full(weight.shape, value, "float32") for weight in model.get_weights()])
        model.save(path)

    return write


def digits_like(value=None, rows=20):
    """Inputs of the digits models, one entry set to `value`."""
    x = np.random.default_rng(0).uniform(0.0, 1.0, (rows, 64)).astype("float32")
    if value is not None:
        x[7, 13] = value
    return x


@functools.cache
def _tf_keras_models(folder):
    """`folder`, holding the models `model_files.TF_KERAS_BUILD` builds (in a child process)."""
    folder.mkdir()
    build_tf_keras_models(folder)
    return folder


def tf_keras_built(name):
    """The model `name` that tf_keras wrote: built once for every case, in a folder beside
    the cases' models."""

    def write(path):
        source = _tf_keras_models(path.parent.parent / "tf_keras") / name
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, path)

    return write


def outside(make, how):
    """`make`'s .h5 model with its first kernel's data in another file, written beside it
    (`model_files.data_from_outside`)."""

    def write(path):
        make(path)
        data_from_outside(path, how, path.parent)

    return write


LAMBDA_MODEL = saved(lambda: [keras.layers.Lambda(lambda t: 2 * t)])
GHOST = first_dense(lambda layer: layer.update(class_name="GhostDense", module="ghost_layers",
                                               registered_name="Ghost>GhostDense"))


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad invocation: how its files are made, what is passed, what must come back."""

    id: str
    code: int
    mentions: tuple  # words the error line must hold: the problem and the fix
    model: Callable | None = copy_of(WIDENED)  # writes the model (None: there is none)
    model_name: str = "model.keras"
    output: str = "out/result.keras"  # in the case folder; INPUT: the model itself
    data: Callable | None = None  # writes the --data file into a folder, returns its path
    args: tuple = ()  # more options: "{folder}" and "{model}" are filled in
    commands: tuple = ("prune", "embed")
    existing: tuple = ()  # (path in the case folder, bytes or a function making it) made first, kept as they are
    read_only_output: bool = False


CATALOGUE = [
    # model files that cannot be read
    Case("model-missing", 2, ("not found", "check the path"), model=None, commands=MODEL_COMMANDS),
    Case("model-empty", 2, ("empty", "re-save"), raw(lambda: b""), commands=MODEL_COMMANDS),
    Case("model-truncated", 2, ("truncated or corrupt", "re-save"),
         raw(lambda: WIDENED.read_bytes()[: WIDENED.stat().st_size // 2]), commands=MODEL_COMMANDS),
    Case("model-random-bytes", 2, ("truncated or corrupt", "re-save"),
         raw(lambda: np.random.default_rng(0).bytes(4096)), commands=MODEL_COMMANDS),
    Case("h5-random-bytes", 2, ("not an HDF5 file", "re-save"), raw(lambda: np.random.default_rng(1).bytes(4096)),
         model_name="model.h5"),
    Case("config-not-json", 2, ("could not read", "re-save"), rezipped(lambda config: "{not json"),
         commands=MODEL_COMMANDS),
    Case("config-missing", 2, ("could not read", "re-save"), rezipped(drop=("config.json",))),
    Case("config-disagrees-with-weights", 2, ("could not read", "re-save"),
         rezipped(first_dense(lambda layer: layer["config"].update(units=50)))),
    Case("config-declares-huge-layer", 2, ("declares", "re-save"),
         rezipped(first_dense(lambda layer: layer["config"].update(units=10**9))), commands=MODEL_COMMANDS),
    Case("model-unknown-extension", 2, ("'.txt'", "pass a .keras or .h5 file"), model_name="model.txt",
         commands=MODEL_COMMANDS),
    Case("keras-archive-named-h5", 2, ("is a .keras file", "rename it"), model_name="model.h5"),
    Case("savedmodel-folder", 4, ("SavedModel", "pass the .keras or .h5 file"), savedmodel_folder,
         model_name="export", commands=MODEL_COMMANDS),
    # archives that try to write outside the extraction folder
    Case("archive-member-climbs-out", 2, ("../../evil", "tampered"),
         rezipped(extra=[("../../evil", b"outside")]), commands=MODEL_COMMANDS),
    Case("archive-member-absolute", 2, ("/tmp/keras-embed-evil", "tampered"),
         rezipped(extra=[("/tmp/keras-embed-evil", b"outside")])),
    # models keras-embed does not rewrite
    Case("lambda-layer-in-safe-mode", 2, ("safe mode", "--unsafe"), LAMBDA_MODEL, commands=MODEL_COMMANDS),
    Case("lambda-layer-with-unsafe", 4, ("Lambda", "supported layers"), LAMBDA_MODEL, args=("--unsafe",)),
    Case("unknown-custom-layer", 4, ("GhostDense", "stock Keras layers"), rezipped(GHOST), commands=MODEL_COMMANDS),
    Case("conv-lstm-layer", 4, ("ConvLSTM1D", "supported layers"),
         saved(lambda: [keras.layers.ConvLSTM1D(2, 3), keras.layers.Flatten()], shape=(4, 8, 1))),
    Case("repeat-vector-layer", 4, ("RepeatVector", "supported layers"),
         saved(lambda: [keras.layers.Dense(4), keras.layers.RepeatVector(2)]), commands=MODEL_COMMANDS),
    # calibration data
    Case("data-missing", 2, ("not found", "check the path"), data=file("missing.npy"), commands=MODEL_COMMANDS),
    Case("data-unknown-extension", 2, ("unknown data format", ".npy or .npz"), data=file("data.csv", b"1,2,3\n")),
    Case("data-corrupt", 2, ("could not read data file", "np.save"), data=file("data.npy", b"\x93NUMPY garbage")),
    Case("data-pickled-objects", 2, ("could not read data file", "np.save"), data=pickled),
    Case("data-wrong-shape", 2, ("(4, 7)", "(n, 64)"), data=npy(lambda: np.zeros((4, 7), "float32")),
         commands=MODEL_COMMANDS),
    Case("data-wrong-dtype", 2, ("dtype <U1", "numeric"), data=npy(lambda: np.full((3, 64), "a"))),
    Case("data-nan", 2, ("NaN", "clean it"), data=npy(lambda: digits_like(np.nan)), commands=MODEL_COMMANDS),
    Case("data-inf", 2, ("infinite", "clean it"), data=npy(lambda: digits_like(-np.inf))),
    Case("data-empty", 2, ("no samples", "at least one"), data=npy(lambda: np.zeros((0, 64), "float32"))),
    Case("npz-without-arrays", 2, ("no arrays", "np.savez"), data=npz()),
    Case("labels-wrong-length", 2, ("4 labels", "one label per row"),
         data=npz(x=lambda: digits_like(rows=5), y=lambda: np.arange(4)), commands=MODEL_COMMANDS),
    # where the output goes
    Case("output-is-input", 2, ("is also the model input", "choose another path"), output=INPUT),
    Case("output-folder-missing", 2, ("does not exist", "create it first"), output="missing/result.keras"),
    Case("output-folder-read-only", 2, ("not writable", "choose another path"), read_only_output=True),
    Case("output-exists", 2, ("already exists", "--overwrite"), existing=(("out/result.keras", b"an older model"),)),
    Case("output-is-a-plain-folder", 2, ("not a SavedModel", "choose a new path"), output="out/",
         existing=(("out/notes.txt", b"keep me"),)),
    Case("output-folder-holds-input", 2, ("choose a new path",), output="in/"),
    Case("output-unknown-extension", 2, ("cannot tell the format", "--format"), output="out/result.pb"),
    Case("report-is-input", 2, ("is also the model input", "choose another path"), args=("--report", "{model}"),
         commands=("prune",)),
    Case("report-is-output", 2, ("is also the model input or another output", "choose another path"),
         args=("--report", "{output}"), commands=("prune",)),
    Case("analysis-json-folder-missing", 2, ("does not exist", "create it first"),
         args=("--json", "{folder}/missing/analysis.json"), commands=("analyze",)),
    Case("report-exists", 2, ("already exists", "--overwrite"), args=("--report", "{folder}/out/report.json"),
         existing=(("out/report.json", b'{"an": "older report"}\n'),), commands=("prune",)),
    Case("report-folder-missing", 2, ("does not exist", "create it first"),
         args=("--report", "{folder}/missing/report.json"), commands=("prune",)),
    # options
    Case("atol-negative", 2, ("--atol", "x>=0"), args=("--atol", "-1")),
    Case("atol-not-a-number", 2, ("--atol", "not a valid float"), args=("--atol", "abc")),
    Case("atol-that-verification-fails", 3, ("above the tolerance", "raise --atol"), args=("--atol", "1e-12")),
    Case("batch-size-zero", 2, ("--batch-size", "x>=1"), args=("--batch-size", "0")),
    *(Case(f"keep-ratio-{value}", 2, ("--keep-ratio", "(0, 1]"), args=("--mode", "data", "--keep-ratio", value),
           data=npy(digits_like), commands=("prune",)) for value in ("0", "1.5", "-0.5")),
    # resources
    Case("gram-too-large-for-data-mode", 2, ("8192 units", "512 MiB", "--mode exact"), wide_model,
         data=npy(lambda: np.ones((8, 1), "float32")), args=("--mode", "data", "--keep-ratio", "0.5"),
         commands=("prune",)),
    # issue 15: plain SavedModels that would run something when loaded or served (payload or secret beside them)
    *(Case(f"savedmodel-{name}", 4, (op, "nothing was run", "pass the .keras or .h5 file"),
           lambda path, build=build: build(path, path.parent / "payload"), model_name="export", commands=("prune",))
      for name, (build, op) in hostile_savedmodels.BUILDERS.items()),
    Case("savedmodel-pbtxt-not-text", 4, ("SavedModel keras-embed cannot read", "pass the .keras or .h5 file"),
         lambda path: path.mkdir() or (path / "saved_model.pbtxt").write_bytes(b"\xff\xfe not text"),
         model_name="export", commands=("prune",)),
    # issue 15: tf_keras inputs (code found on the parsed config), .h5 data from other files
    Case("tf-keras-lambda-escaped-h5", 2, ("in/model.h5' holds code (a Lambda layer)", "--unsafe"),
         tf_keras_built("lambda_escaped.h5"), model_name="model.h5", commands=("prune",)),
    Case("tf-keras-lambda-escaped-savedmodel", 2, ("in/savedmodel' holds code (a Lambda layer)", "--unsafe"),
         tf_keras_built("lambda_escaped_savedmodel"), model_name="savedmodel", commands=("prune",)),
    Case("tf-keras-tf-op-lambda", 2, ("in/model.h5' holds code (a TFOpLambda layer)", "--unsafe"),
         tf_keras_built("tf_op.h5"), model_name="model.h5", commands=("prune",)),
    *(Case(f"{kind}-h5-data-{how}", 2, ("which keras-embed does not read", "re-save"), outside(make, how),
           model_name="model.h5", commands=MODEL_COMMANDS)
      for kind, make in (("keras3", saved(lambda: [])), ("tf-keras", tf_keras_built("legacy.h5"))) for how in OUTSIDE),
    # issue 15: outputs are regular files or folders, write failures, option values, broken models
    Case("analysis-json-exists", 2, ("already exists", "--overwrite"), args=("--json", "{folder}/out/analysis.json"),
         existing=(("out/analysis.json", b'{"an": "unrelated file"}\n'),), commands=("analyze",)),
    *(Case(f"{side}-is-{kind}", 2, (mentions, "choose another path"), args=(option, "{folder}/out/special", "--overwrite"),
           existing=(("out/special", make),), commands=(command,))
      for side, option, command in (("analysis-json", "--json", "analyze"), ("report", "--report", "prune"))
      for kind, make, mentions in (("a-fifo", fifo, "a FIFO"), ("a-device", device, "a character device"))),
    Case("output-is-a-fifo-even-with-overwrite", 2, ("a FIFO", "choose another path"), output="out/special.keras",
         args=("--overwrite",), existing=(("out/special.keras", fifo),)),
    Case("output-is-a-device-even-with-overwrite", 2, ("a character device", "choose another path"),
         output="out/special.keras", args=("--overwrite",), existing=(("out/special.keras", device),)),
    Case("output-is-a-symlink-to-a-fifo", 2, ("a symlink to a FIFO", "choose another path"), output="out/link.keras",
         args=("--overwrite",), existing=(("out/pipe", fifo), ("out/link.keras", symlink_to("pipe")))),
    Case("output-name-too-long", 2, ("256-byte name", "shorter name"), output="out/" + "n" * 250 + ".keras"),
    *(Case(f"option{option}-{value}", 2, (option, "not a finite number"), args=(option, value), commands=commands)
      for option, commands, values in (("--rtol", ("prune", "analyze"), ("nan", "inf")),
                                       ("--lin-tol", ("prune", "analyze"), ("nan", "inf")),
                                       ("--atol", ("prune", "embed"), ("nan", "inf", "1e999")),
                                       ("--cos", ("prune",), ("nan",)), ("--margin", ("embed",), ("nan", "inf")))
      for value in values),
    *(Case(f"option{option}-{value}", 2, (option, "not a finite number"), args=("--mode", "data", option, value),
           data=npy(digits_like), commands=("prune",))
      for option in ("--max-output-error", "--keep-ratio", "--max-accuracy-drop") for value in ("nan", "-inf")),
    *(Case(f"widen-alpha-{value}", 2, ("--widen", "not a finite number"), args=("--widen", f"0:1:{value}"),
           commands=("embed",)) for value in ("nan", "inf", "-inf")),
    Case("widen-alpha-overflows-float32", 2, ("too large for its dtype", "smaller --widen ALPHA"),
         args=("--widen", "0:1:1e300"), commands=("embed",)),
    Case("null-bias-nan", 2, ("--null", "not a finite number"), args=("--null", "0:nan"), commands=("embed",)),
    Case("model-nan-weights", 2, ("'hidden'", "NaN or infinite weights", "retrain"), weights_set(np.nan),
         commands=MODEL_COMMANDS),
    Case("model-infinite-weights", 2, ("'hidden'", "NaN or infinite weights", "retrain"), weights_set(np.inf)),
    Case("model-outputs-overflow", 2, ("NaN or infinite", "check its weights and the data"), weights_set(1e30)),
    Case("model-outputs-overflow-data-mode", 2, ("NaN or infinite", "check the model's weights and the data"),
         weights_set(1e30), data=npy(lambda: np.ones((8, 5), "float32")), args=("--mode", "data", "--keep-ratio", "0.5"),
         commands=("prune",)),
    # issue 15: memory bombs in model and data files (small versions of test_security.py's cases under 4 GB)
    Case("config-padded-past-the-limit", 2, ("config.json, more than", "re-save"),
         lambda path: hostile.padded_config(path, gibibytes=0.125), commands=MODEL_COMMANDS),
    Case("config-given-twice", 2, ("'config.json' twice", "re-save"),
         lambda path: hostile.second_config(path, gibibytes=0.125), commands=MODEL_COMMANDS),
    Case("dense-after-flatten-without-build-config", 2, ("no build_config", "re-save"),
         lambda path: hostile.flattened_unbuilt(path, gibibytes=0.125), commands=MODEL_COMMANDS),
    Case("h5-dense-after-flatten-declares-too-much", 2, ("declares", "re-save"),
         lambda path: hostile.flattened_h5(path, gibibytes=0.125), model_name="model.h5", commands=MODEL_COMMANDS),
    Case("huge-conv2d", 2, ("declares", "re-save"), hostile.huge_conv2d(gibibytes=0.125), commands=MODEL_COMMANDS),
    Case("huge-embedding", 2, ("declares", "re-save"), hostile.huge_embedding(gibibytes=0.125)),
    Case("archive-claims-more-than-the-file", 2, ("claim", "re-save"),
         lambda path: hostile.lying_stored_size(path, gibibytes=0.125)),
    Case("weights-zip-bomb", 2, ("zip bomb", "re-save"), lambda path: hostile.weights_bomb(path, gibibytes=0.125),
         commands=MODEL_COMMANDS),
    Case("weights-store-far-less-than-they-declare", 2, ("more than they store", "re-save"),
         lambda path: hostile.hollow_weights(path, gibibytes=0.125)),
    Case("h5-weights-store-far-less-than-they-declare", 2, ("more than they store", "re-save"),
         lambda path: hostile.hollow_h5(path, gibibytes=0.125), model_name="model.h5"),
    Case("config-zip-bomb", 2, ("config.json, more than", "re-save"),
         lambda path: hostile.config_bomb(path, gibibytes=1 / 32)),
    Case("npz-zip-bomb", 2, ("compressed, inflating to 536870912 bytes", "np.savez"),
         data=written(lambda path: hostile.npz_bomb(path, gibibytes=0.5), "data.npz"), commands=MODEL_COMMANDS),
    Case("npz-header-declares-more-than-it-holds", 2, ("declares a (1000000000000, 64)", "np.save"),
         data=written(hostile.npz_lying_header, "data.npz")),
    Case("npy-header-declares-more-than-it-holds", 2, ("declares a (1000000000000, 64)", "np.save"),
         data=written(hostile.npy_lying_header, "data.npy")),
]
RUNS = [pytest.param(case, command, id=f"{case.id}-{command}") for case in CATALOGUE for command in case.commands]


# ---------------------------------------------------------------- checks


def invoke(*args):
    """Runs `keras-embed ARGS...` in-process; stdout and stderr come back separately."""
    return CliRunner().invoke(main, [str(arg) for arg in args], prog_name="keras-embed")


def error_line(code, exit_code, stdout, stderr):
    """Checks the exit code, an empty stdout and one error line on stderr (ours, or the
    `Error:` line of click's usage message), without traceback; returns that line."""
    assert exit_code == code, f"exit {exit_code}, wanted {code}\n{stdout}\n{stderr}"
    assert "Traceback" not in stdout + stderr
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert lines, "no error message on stderr"
    if lines[0].startswith("Usage:"):  # click: usage, hint, blank line, Error: ...
        assert [line for line in lines if line.startswith("Error: ")] == [lines[-1]], stderr
    else:
        assert lines == [lines[0]] and lines[0].startswith("keras-embed: error: "), stderr
    return lines[-1]


def snapshot(folder):
    """Every path under `folder` with its bytes (None for folders)."""
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


@contextlib.contextmanager
def read_only(folder):
    """`folder` refuses new entries meanwhile: mode 555, plus the immutable flag for root."""
    folder.chmod(0o555)
    immutable = (os.geteuid() == 0 and shutil.which("chattr") is not None
                 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0)
    try:
        if os.access(folder, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
            pytest.skip("cannot make a folder read-only here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.fixture(scope="module")
def made_models(tmp_path_factory):
    """Each case's model, written once: case id -> path."""
    folder, made = tmp_path_factory.mktemp("catalogue-models"), {}

    def model_of(case):
        if case.id not in made:
            made[case.id] = folder / case.id / case.model_name
            made[case.id].parent.mkdir()
            case.model(made[case.id])
        return made[case.id]

    return model_of


def set_up(case, folder, made_models):
    """The case's files in `folder` (in/ with the model and data, out/); returns the arguments."""
    (folder / "in").mkdir()
    (folder / "out").mkdir()
    model = folder / "in" / case.model_name
    if case.model is not None:
        source = made_models(case)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, model)
    for name, content in case.existing:
        content(folder / name) if callable(content) else (folder / name).write_bytes(content)
    output = model if case.output == INPUT else f"{folder}/{case.output}"
    fill = {"model": model, "output": output, "folder": folder}
    data = () if case.data is None else ("--data", case.data(folder / "in"))
    return [str(arg).format(**fill) for arg in (*data, *case.args)], fill


@pytest.mark.filterwarnings("ignore:The object being serialized includes a `lambda`")
@pytest.mark.parametrize("case, command", RUNS)
def test_bad_input_is_refused_in_one_line_and_touches_nothing(tmp_path, made_models, case, command):
    options, fill = set_up(case, tmp_path, made_models)
    args = [part.format(**fill) for part in COMMANDS[command]] + options
    before = snapshot(tmp_path)

    with read_only(tmp_path / "out") if case.read_only_output else contextlib.nullcontext():
        result = invoke(*args)

    line = error_line(case.code, result.exit_code, result.stdout, result.stderr)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    missing = [word for word in case.mentions if word not in line]
    assert not missing, f"{line!r} does not mention {missing}"
    assert snapshot(tmp_path) == before  # inputs byte-identical, no output, no temporary file


def test_the_catalogue_covers_every_documented_exit_code_and_twenty_cases():
    assert len(CATALOGUE) >= 20 and len({case.id for case in CATALOGUE}) == len(CATALOGUE)
    assert {case.code for case in CATALOGUE} == {2, 3, 4}


# ---------------------------------------------------------------- the real console script


@pytest.mark.parametrize("case, command", [
    pytest.param(case, command, id=f"{case.id}-{command}") for case in CATALOGUE for command in case.commands
    if (case.id, command) in {("lambda-layer-in-safe-mode", "analyze"), ("archive-member-climbs-out", "prune")}
])
def test_the_console_script_prints_one_line_too(tmp_path, made_models, case, command):
    """No TensorFlow log line or Python warning reaches a real terminal either."""
    options, fill = set_up(case, tmp_path, made_models)
    before = snapshot(tmp_path)
    script = Path(sys.executable).with_name("keras-embed")
    environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([script, *[part.format(**fill) for part in COMMANDS[command]], *options],
                          capture_output=True, text=True, env=environment, timeout=300)
    line = error_line(case.code, done.returncode, done.stdout, done.stderr)
    assert all(word in line for word in case.mentions), line
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- --overwrite


@pytest.mark.parametrize("command", ["prune", "embed"])
def test_overwrite_replaces_an_existing_output_with_a_complete_model(tmp_path, command):
    output = tmp_path / "result.keras"
    output.write_bytes(b"an older model")
    args = [part.format(model=WIDENED, output=output) for part in COMMANDS[command]]

    result = invoke(*args, "--overwrite")

    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["result.keras"]
    assert keras.saving.load_model(output).count_params() > 0
