"""What keras-embed guarantees about untrusted model and data files (README: Security).

- No code path unpickles, evals or execs: the package sources hold none of it.
- Keras safe mode is on for every load unless the caller asks for `unsafe`.
- No member of a .keras archive is written outside an extraction folder: names that are
  absolute or climb out with '..' make the file refused before Keras opens it.
- A config declaring far more weights than the file stores is refused before Keras
  allocates them, and a damaged .h5 that sends the HDF5 library into an endless loop is
  stopped after a timeout instead of hanging the command.
- A plain SavedModel is read without TensorFlow loading it: one holding ops with side
  effects anywhere (`tests/hostile_savedmodels.py`) or an init op that does something is
  refused before anything runs; its files must be regular files, not links.
- A tf_keras config holding code is found on the parsed JSON, however it is spelled; an
  .h5 file whose data lives in other files is refused before anything reads it.
- Zip bombs, hollow HDF5 datasets and data files declaring more than they hold are refused
  before anything is inflated or allocated, also under a 4 GB address space.
- Outputs are regular files or SavedModel folders: a device, FIFO or socket at an output
  path (or a symlink to one) is refused before the work and again before the rename.
"""

import functools
import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import hostile
import hostile_savedmodels
from keras_embed.files import data as data_module
from keras_embed.files import load as model_load, save as model_save
from keras_embed.files.config_weights import _LAYER_WEIGHTS
from keras_embed.files.data import LazyCast, batches, check_inputs, load_data
from keras_embed.errors import InputError
from keras_embed.model.graph import Node
from keras_embed.files.load import declared_weights, load_model
from keras_embed.files.tf_keras_code import code_in_config, refuse_code
from model_files import OUTSIDE, SECRET, data_from_outside

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(path for folder in ("keras_embed", "tools", "callbacks") for path in (ROOT / folder).rglob("*.py"))
WIDENED = ROOT / "saved_models" / "digits_widened.keras"
FORBIDDEN = {
    "pickle": r"\b(c?pickle|dill|marshal|shelve|joblib)\b",
    "eval": r"(?<![\w.])eval\s*\(",
    "exec": r"(?<![\w.])exec\s*\(",
    "dynamic import": r"__import__\s*\(",
    "numpy pickles": r"allow_pickle\s*=\s*True",
    "safe mode off": r"safe_mode\s*=\s*False|enable_unsafe_deserialization",
}


def test_the_sources_are_found():
    assert len(SOURCES) > 20 and ROOT / "keras_embed" / "files" / "load.py" in SOURCES


@pytest.mark.parametrize("what", FORBIDDEN)
def test_no_source_unpickles_evals_or_execs(what):
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in SOURCES for number, line in enumerate(path.read_text().splitlines(), start=1)
             if re.search(FORBIDDEN[what], line)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("unsafe", [False, True])
def test_load_model_passes_safe_mode_unless_asked_not_to(monkeypatch, unsafe):
    seen = {}
    monkeypatch.setattr(keras.saving, "load_model", lambda path, **options: seen.update(options))
    load_model(WIDENED, unsafe=unsafe)
    assert seen == {"compile": False, "safe_mode": not unsafe}


def archive_with_member(path, name):
    shutil.copyfile(WIDENED, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(name, b"written outside the archive's folder")


@pytest.mark.parametrize("name", ["../../evil.txt", "assets/../../../evil.txt", "/tmp/keras-embed-evil.txt",
                                  "..\\..\\evil.txt", "C:/evil.txt"])
@pytest.mark.parametrize("unsafe", [False, True])
def test_archive_members_that_escape_are_refused_and_nothing_is_written(tmp_path, monkeypatch, name, unsafe):
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # Keras extracts under the temp folder
    model = work / "model.keras"
    archive_with_member(model, name)
    before = sorted(str(path) for path in tmp_path.rglob("*"))

    with pytest.raises(InputError, match="points outside the archive"):
        load_model(model, unsafe=unsafe)

    assert sorted(str(path) for path in tmp_path.rglob("*")) == before
    assert not Path("/tmp/keras-embed-evil.txt").exists()


def test_declared_weights_of_a_real_config_are_its_dense_weights():
    config = zipfile.ZipFile(WIDENED).read("config.json")
    model = keras.saving.load_model(WIDENED)
    assert declared_weights(config) == model.count_params()
    assert declared_weights(b"not json") == 0


def test_a_config_declaring_a_billion_units_is_refused_before_keras_builds_it(tmp_path, monkeypatch):
    model = tmp_path / "huge.keras"
    config = json.loads(zipfile.ZipFile(WIDENED).read("config.json"))
    config["config"]["layers"][1]["config"]["units"] = 10**9
    with zipfile.ZipFile(WIDENED) as source, zipfile.ZipFile(model, "w") as target:
        for info in source.infolist():
            target.writestr(info, json.dumps(config) if info.filename == "config.json" else source.read(info))
    monkeypatch.setattr(keras.saving, "load_model", lambda *args, **options: pytest.fail("Keras was reached"))
    with pytest.raises(InputError, match="declares 65000002134 weights"):
        load_model(model)


def test_a_damaged_h5_that_hangs_the_hdf5_library_is_stopped(tmp_path, monkeypatch):
    """One byte inserted into the config text inside the HDF5 global heap makes libhdf5
    loop forever (found by the loader fuzz); the isolated first read times out instead."""
    source = tmp_path / "source.h5"
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]).save(source)
    content = source.read_bytes()
    where = content.index(b'{"module"', content.index(b"GCOL")) + 10
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(content[:where] + b"\xfc" + content[where:])
    monkeypatch.setattr(model_load, "HDF5_TIMEOUT", 3)

    start = time.monotonic()
    with pytest.raises(InputError, match="did not finish in 3 s"):
        load_model(damaged)
    assert time.monotonic() - start < 30
    assert load_model(source).count_params() == 18  # an intact file still loads


def test_the_isolated_hdf5_read_does_not_import_from_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "h5py.py").write_text("raise SystemExit(99)\n")
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model.h5"
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]).save(model)
    assert load_model(model).count_params() == 18
    assert sorted(os.listdir(tmp_path)) == ["h5py.py", "model.h5"]


# ---------------------------------------------------------------- issue 15: SavedModels are read without running them


def refusal(path, output):
    """`keras-embed prune PATH -o OUTPUT`: (exit code, the one stderr line)."""
    from click.testing import CliRunner

    from keras_embed.tools.cli import main

    result = CliRunner().invoke(main, ["prune", str(path), "-o", str(output)], prog_name="keras-embed")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return result.exit_code, lines[0]


def files_under(folder):
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", hostile_savedmodels.BUILDERS)
def test_a_savedmodel_with_side_effects_is_refused_before_anything_of_it_runs(tmp_path, name):
    """Each would write `file` when TensorFlow loads or serves it (or read `file`, a local
    secret, into its weights); `prune` names the op, exits 4 and nothing is written."""
    build, op = hostile_savedmodels.BUILDERS[name]
    model, file = tmp_path / "model", tmp_path / "file"
    build(model, file)
    secret = file.exists()
    before = files_under(tmp_path)

    code, line = refusal(model, tmp_path / "out")

    assert code == 4 and op in line and "nothing was run" in line and "pass the .keras or .h5 file" in line, line
    assert files_under(tmp_path) == before  # no payload, no output, the model untouched
    assert secret or not file.exists()


def edited(folder, edit):
    """Rewrites `folder`'s saved_model.pb after `edit(saved_model_proto)`."""
    from tensorflow.python.saved_model import loader_impl

    saved_model = loader_impl.parse_saved_model(str(folder))
    edit(saved_model)
    (folder / "saved_model.pb").write_bytes(saved_model.SerializeToString())


def write_file_node(graph_or_function, name="payload"):
    """A WriteFile node that would write 'payload' (its inputs are two string constants)."""
    nodes = getattr(graph_or_function, "node", None) or graph_or_function.node_def
    for constant in ("filename", "contents"):
        node = nodes.add(name=f"{name}_{constant}", op="Const")
        node.attr["dtype"].type = 7  # DT_STRING
        node.attr["value"].tensor.dtype = 7
        node.attr["value"].tensor.string_val.append(b"payload")
    writer = nodes.add(name=name, op="WriteFile")
    is_function = not hasattr(graph_or_function, "node")
    writer.input.extend([f"{name}_{c}:output:0" if is_function else f"{name}_{c}" for c in ("filename", "contents")])


def clean_tf2(folder):
    import tensorflow as tf

    hostile_savedmodels.tf2(folder, lambda x, kernel: tf.matmul(x, kernel))


def into_restore_function(saved_model):
    """WriteFile in the saver's restore function, where RestoreV2 itself is allowed."""
    (function,) = [f for f in saved_model.meta_graphs[0].graph_def.library.function if "traced_restore" in
                   f.signature.name]
    write_file_node(function)


def posing_as_op(saved_model):
    """A library function named WriteFile, which a node of that type would call."""
    library = saved_model.meta_graphs[0].graph_def.library
    library.function.add().CopyFrom(library.function[0])
    library.function[-1].signature.name = "WriteFile"


def into_graph_unconnected(saved_model):
    write_file_node(saved_model.meta_graphs[0].graph_def)


def restore_shared_with_serving(saved_model):
    """The serving output reads a RestoreV2 that the saver's restore op also depends on."""
    graph = saved_model.meta_graphs[0].graph_def
    (serving,) = [node for node in graph.node if node.name == "StatefulPartitionedCall"]
    (restore,) = [node for node in graph.node if node.name == saved_model.meta_graphs[0].saver_def.restore_op_name]
    stolen = graph.node.add(name="stolen", op="RestoreV2", input=["saver_filename", "stolen_names", "stolen_names"])
    stolen.attr["dtypes"].list.type.append(1)
    graph.node.add(name="stolen_names", op="Const").attr["dtype"].type = 7
    serving.input.append("stolen")
    restore.input.append("^stolen")


def into_another_meta_graph(saved_model):
    """A second meta graph (tagged 'train'), which keras-embed does not read, holds WriteFile."""
    other = saved_model.meta_graphs.add()
    other.CopyFrom(saved_model.meta_graphs[0])
    other.meta_info_def.ClearField("tags")
    other.meta_info_def.tags.append("train")
    write_file_node(other.graph_def)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("edit, op", [(into_restore_function, "WriteFile"), (posing_as_op, "WriteFile"),
                                      (into_graph_unconnected, "WriteFile"), (into_another_meta_graph, "WriteFile"),
                                      (restore_shared_with_serving, "RestoreV2")])
def test_side_effects_are_found_wherever_the_savedmodel_holds_them(tmp_path, edit, op):
    from keras_embed.files.inputs import load_input

    clean_tf2(tmp_path / "model")
    assert load_input(tmp_path / "model", "savedmodel")[0].count_params() == 3 * 2 + 2  # the clean one: a Dense
    edited(tmp_path / "model", edit)
    code, line = refusal(tmp_path / "model", tmp_path / "out")
    assert code == 4 and re.search(f"does not run .*: ([A-Za-z0-9]+, )*{op}[;,]", line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore")
def test_a_text_savedmodel_is_checked_as_its_binary_twin(tmp_path):
    from google.protobuf import text_format
    from tensorflow.python.saved_model import loader_impl

    hostile_savedmodels.BUILDERS["tf1-main-op-writes"][0](tmp_path / "model", tmp_path / "payload")
    saved_model = loader_impl.parse_saved_model(str(tmp_path / "model"))
    (tmp_path / "model" / "saved_model.pb").unlink()
    (tmp_path / "model" / "saved_model.pbtxt").write_text(text_format.MessageToString(saved_model))
    code, line = refusal(tmp_path / "model", tmp_path / "out")
    assert code == 4 and "WriteFile" in line and not (tmp_path / "payload").exists()


@pytest.mark.filterwarnings("ignore")
def test_an_init_op_that_assigns_variables_is_refused_since_keras_embed_runs_none(tmp_path):
    """TensorFlow would serve the kernel main_op assigns, not the checkpoint's."""
    import tensorflow as tf

    def zero_kernel(x, y):
        (kernel,) = tf.compat.v1.global_variables()
        return y, {"main_op": kernel.assign(tf.zeros_like(kernel)).op}

    hostile_savedmodels.tf1(tmp_path / "model", zero_kernel)
    code, line = refusal(tmp_path / "model", tmp_path / "out")
    assert code == 4 and "init op (saved_model_main_op) that runs Assign" in line, line
    assert not (tmp_path / "out").exists()


def exported_and_expected(folder):
    """A Keras export at `folder`, inputs and the outputs Keras computes for them."""
    import numpy as np

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    model.export(str(folder), verbose=False)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    return x, model.predict(x, verbose=0)


def fail_if_called(*args, **kwargs):
    pytest.fail("a SavedModel was loaded by TensorFlow or a graph was run")


def patch_loaders(monkeypatch):
    """Every TensorFlow entry point that loads a SavedModel (and runs its init ops) fails."""
    import tensorflow as tf
    from tensorflow.python.saved_model import load, load_v1_in_v2, loader_impl

    for owner, name in ((tf.saved_model, "load"), (load, "load"), (load_v1_in_v2, "load"),
                        (loader_impl.SavedModelLoader, "load"), (loader_impl.SavedModelLoader, "run_init_ops")):
        monkeypatch.setattr(owner, name, fail_if_called)


@pytest.mark.filterwarnings("ignore")
def test_a_tf2_init_op_signature_that_assigns_a_variable_is_refused(tmp_path):
    def reset_by_init_op(saved_model):
        graph = saved_model.meta_graphs[0].graph_def
        graph.node.add(name="reset", op="AssignVariableOp", input=["Variable", "Variable/Read/ReadVariableOp"])
        graph.node[-1].attr["dtype"].type = 1  # DT_FLOAT
        saved_model.meta_graphs[0].signature_def["__saved_model_init_op"].outputs["__saved_model_init_op"].name = "reset"

    clean_tf2(tmp_path / "model")
    edited(tmp_path / "model", reset_by_init_op)
    code, line = refusal(tmp_path / "model", tmp_path / "out")
    assert code == 4 and "init op (__saved_model_init_op) that runs AssignVariableOp" in line, line


@pytest.mark.filterwarnings("ignore")
def test_a_legit_savedmodel_is_read_without_tensorflow_loading_it(tmp_path, monkeypatch):
    import numpy as np

    from keras_embed.files.inputs import load_input

    x, expected = exported_and_expected(tmp_path / "export")
    patch_loaders(monkeypatch)
    model, _ = load_input(tmp_path / "export", "savedmodel")
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_reading_the_serving_graph_runs_no_session_either(tmp_path, monkeypatch):
    """Only `files.savedmodel` evaluates constants, after the graph was read and checked."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.client import session

    from keras_embed.files.savedmodel_read import read_serving_graph

    x, expected = exported_and_expected(tmp_path / "export")
    with monkeypatch.context() as patched:
        patch_loaders(patched)
        patched.setattr(session.BaseSession, "__init__", fail_if_called)
        patched.setattr(session.BaseSession, "run", fail_if_called)
        serving = read_serving_graph(tmp_path / "export")
    with tf.compat.v1.Session(graph=serving.graph) as run:
        np.testing.assert_allclose(run.run(serving.output, {serving.input: x}), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("swap", ["symlink", "folder-named-like-the-prefix"])
def test_savedmodel_variables_that_are_links_or_folders_are_refused(tmp_path, swap):
    """A `variables.data` file linking to a local file would make its bytes weights; a folder
    named like the checkpoint prefix would make TensorFlow follow its 'checkpoint' file."""
    clean_tf2(tmp_path / "model")
    variables = tmp_path / "model" / "variables"
    if swap == "symlink":
        (data,) = variables.glob("variables.data-*")
        secret = tmp_path / "secret"
        secret.write_bytes(data.read_bytes())
        data.unlink()
        data.symlink_to(secret)
    else:
        (variables / "variables").mkdir()
        (variables / "variables" / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/ckpt"\n')
    code, line = refusal(tmp_path / "model", tmp_path / "out")
    assert code == 2 and "links or special files" in line and "variables/variables" in line, line
    assert not (tmp_path / "out").exists()


def clean_tf1(folder):
    hostile_savedmodels.tf1(folder, lambda x, y: (y, {}))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("keep", [0, 20])
@pytest.mark.parametrize("build", [clean_tf1, clean_tf2])
def test_a_truncated_savedmodel_checkpoint_is_refused_as_corrupt(tmp_path, build, keep):
    build(tmp_path / "model")
    (data,) = (tmp_path / "model" / "variables").glob("variables.data-*")
    data.write_bytes(data.read_bytes()[:keep])
    code, line = refusal(tmp_path / "model", tmp_path / "out")
    assert code == 2 and "truncated or corrupt" in line and "re-export it" in line, line


@pytest.mark.filterwarnings("ignore")
def test_a_serving_function_that_changes_a_variable_is_refused(tmp_path):
    """TensorFlow would serve the assigned value (every op of a function runs); keras-embed
    reads the checkpoint's, so it refuses instead of computing something else."""
    import tensorflow as tf

    def doubled(x, kernel):
        kernel.assign(kernel * 2.0)
        return tf.matmul(x, kernel)

    hostile_savedmodels.tf2(tmp_path / "model", doubled)
    code, line = refusal(tmp_path / "model", tmp_path / "out")
    assert code == 4 and "changes variables while it serves (AssignVariableOp)" in line, line


# ---------------------------------------------------------------- issue 15: tf_keras inputs, .h5 data from other files

CODE_CONFIGS = {  # tf_keras config text -> the code it holds; every one defeats a search for the text '"Lambda"'
    '{"class_name": "\\u004cambda", "config": {}}': "a Lambda layer",
    '{"class_name": "Lamb\\u0064a"}': "a Lambda layer",
    '{"class_name": "Lambda", "class_name": "Dense"}': "a Lambda layer",  # duplicate keys: whichever is read
    '{"class_name": {"class_name": "__bytes__", "value": "\\u004cambda"}}': "a Lambda layer",  # tf_keras decodes it
    '{"class_name": "Functional", "config": {"layers": [{"class_name": "Sequential", "config": {"layers": ['
    '{"class_name": "TimeDistributed", "config": {"layer": {"class_name": "\\u004cambda"}}}]}}]}}': "a Lambda layer",
    '{"class_name": "Bidirectional", "config": {"layer": {"registered_name": "Custom>Lambda"}}}': "a Lambda layer",
    '{"class_name": "keras.layers.TFOpLambda", "config": {"function": "io.write_file"}}': "a TFOpLambda layer",
    '{"class_name": "SlicingOpLambda"}': "a SlicingOpLambda layer",
    '{"class_name": "InstanceMethod"}': "an InstanceMethod layer",
    '{"class_name": "TensorFlowOpLayer", "config": {"node_def": {"op": "WriteFile"}}}': "a TensorFlowOpLayer",
    '{"activation": {"class_name": "__lambda__", "config": {"value": "4wEAAAAA"}}}': "a Python lambda",
    '{"class_name": "RNN", "config": {"cell": {"class_name": "DropoutWrapper", "config": '
    '{"dropout_state_filter_visitor": ["4wEAAAAA", null, null], "dropout_fn_type": "lambda"}}}}':
        "a Python function stored as bytecode ('dropout_fn_type')",
    '{"activation": {"module": "os", "class_name": "function", "config": "system"}}':
        "a function or class from the Python module 'os'",
    '{"activation": {"module": "builtins", "class_name": "function", "config": "exec"}}':
        "a function or class from the Python module 'builtins'",
    '{"kernel_initializer": {"module": "keras.src.utils.io_utils", "class_name": "function", "config": "os.system"}}':
        "a function or class reached through 'os.system'",
}
PLAIN_CONFIGS = [
    "",
    '{"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense", "config": {"name": "lambda", '
    '"units": 3, "activation": "relu", "kernel_initializer": {"module": "keras.initializers", '
    '"class_name": "GlorotUniform", "config": {"seed": null}, "registered_name": null}}}]}}',
    '{"class_name": "Lambda_like", "config": {"output_shape_type": "raw"}}',
]


@pytest.mark.parametrize("config", CODE_CONFIGS)
def test_code_in_a_tf_keras_config_is_found_on_the_parsed_json_however_spelled(config):
    assert code_in_config(config) == CODE_CONFIGS[config]


@pytest.mark.parametrize("config", PLAIN_CONFIGS)
def test_a_tf_keras_config_of_stock_layers_holds_no_code(config):
    assert code_in_config(config) is None


def protobuf_field(number, payload):
    """One length-delimited protobuf field, encoded by hand (the wire format)."""
    length, size = b"", len(payload)
    while True:
        length += bytes([size & 0x7F | (0x80 if size > 0x7F else 0)])
        size >>= 7
        if not size:
            return bytes([number << 3 | 2]) + length + payload


def saved_metadata(*metadata):
    """keras_metadata.pb bytes: SavedMetadata.nodes (field 1), each a SavedObject whose
    metadata (field 5) is one of `metadata`, given as a list of values the field takes
    in turn (protobuf keeps the last)."""
    return b"".join(protobuf_field(1, b"".join(protobuf_field(5, text.encode()) for text in values))
                    for values in metadata)


def test_keras_metadata_pb_is_parsed_as_protobuf_and_every_nodes_json_checked(tmp_path):
    (tmp_path / "keras_metadata.pb").write_bytes(saved_metadata(
        ['{"class_name": "Dense"}'], ['{"class_name": "Dense"}', '{"class_name": "\\u004cambda", "config": {}}']))
    with pytest.raises(InputError, match=r"holds code \(a Lambda layer\) that safe mode refuses to run; pass --unsafe"):
        refuse_code(tmp_path)
    refuse_code(tmp_path, unsafe=True)

    (tmp_path / "keras_metadata.pb").write_bytes(saved_metadata(['{"class_name": "Lambda"}',
                                                                 '{"class_name": "Dense"}']))
    refuse_code(tmp_path)  # tf_keras reads the last value of the field too: a Dense

    (tmp_path / "keras_metadata.pb").write_bytes(b"\x0a\x20truncated")
    with pytest.raises(InputError, match="damaged keras_metadata.pb"):
        refuse_code(tmp_path)


@pytest.mark.parametrize("how", OUTSIDE)
def test_an_h5_whose_weights_live_in_another_file_is_refused_before_keras_reads_it(tmp_path, monkeypatch, how):
    """External storage would put any local file's bytes into the weights; a virtual dataset
    or an external link reads another HDF5 file. Keras 3 refuses them, tf_keras does not: the
    isolated metadata read every .h5 input goes through refuses them first."""
    model, secrets = tmp_path / "model.h5", tmp_path / "secrets"
    secrets.mkdir()
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]).save(model)
    kernel = data_from_outside(model, how, secrets)
    monkeypatch.setattr(keras.saving, "load_model", lambda *args, **options: pytest.fail("Keras was reached"))

    with pytest.raises(InputError) as refused:
        load_model(model)

    message = str(refused.value)
    assert message.startswith(f"model file '{model}' holds ") and f"'{kernel}'" in message
    assert str(secrets) in message and "\n" not in message and SECRET.decode() not in message


# ---------------------------------------------------------------- issue 15: outputs are regular files or folders


def make_symlink_to_fifo(path):
    os.mkfifo(path.with_name("pipe"))
    os.symlink("pipe", path)


SPECIAL = {"a FIFO": hostile.fifo, "a character device": hostile.device, "a socket": hostile.unix_socket,
           "a symlink to a FIFO": make_symlink_to_fifo}


def kinds(folder):
    """Every entry of `folder` with its file type (as lstat sees it)."""
    return {name: stat.S_IFMT(os.lstat(folder / name).st_mode) for name in os.listdir(folder)}


@pytest.fixture(scope="module")
def small_model():
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", SPECIAL)
def test_a_special_file_at_an_output_path_is_never_replaced(tmp_path, small_model, kind, overwrite):
    target = tmp_path / "special.keras"
    SPECIAL[kind](target)
    before = kinds(tmp_path)

    for write in (lambda: model_save.check_output(target, overwrite=overwrite),
                  lambda: model_save.check_side_output(target, overwrite=overwrite),
                  lambda: model_save.save_model(small_model, target),
                  lambda: model_save.write_text(target, "a report\n")):
        with pytest.raises(InputError, match=f"is {kind};.*regular files or SavedModel folders"):
            write()

    assert kinds(tmp_path) == before  # the same entries, of the same types: nothing replaced, no temporary


@pytest.mark.parametrize("kind", ["a FIFO", "a character device"])
def test_a_target_that_becomes_special_after_the_checks_is_refused_at_the_rename(tmp_path, small_model, kind):
    """The check-then-write gap: the target is checked again right before the rename."""
    report, model = tmp_path / "report.json", tmp_path / "model.keras"
    model_save.check_side_output(report)
    model_save.check_output(model)
    SPECIAL[kind](report)

    with pytest.raises(InputError, match=f"'{report}' is {kind}"):
        model_save.write_text(report, "a report\n")

    def write_then_race(keras_model, temporary):  # the special file appears while the model is written
        keras_model.save(temporary)
        SPECIAL[kind](model)

    with pytest.raises(InputError, match=f"'{model}' is {kind}"):
        model_save.save_model(small_model, model, writer=write_then_race)
    special = stat.S_IFIFO if kind == "a FIFO" else stat.S_IFCHR
    assert kinds(tmp_path) == {"report.json": special, "model.keras": special}  # kept, and no temporary


def test_hessian_json_refuses_a_fifo_even_with_overwrite(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from keras_embed.tools.cli import main

    monkeypatch.setattr(model_load, "load_model", lambda *args: pytest.fail("the work started"))
    pipe = tmp_path / "hessian.json"
    os.mkfifo(pipe)
    result = CliRunner().invoke(main, ["hessian", str(WIDENED), "--loss", "mse", "--dataset", "digits",
                                       "--json", str(pipe), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "is a FIFO" in result.stderr and stat.S_ISFIFO(os.lstat(pipe).st_mode)


@pytest.mark.parametrize("command", [["experiment", "strict-saddle"], ["bn-ablation", "--quick"]])
def test_experiments_refuse_a_special_result_path_before_the_work(tmp_path, monkeypatch, command):
    from click.testing import CliRunner

    from keras_embed.experiments import bn_ablation, strict_saddle
    from keras_embed.tools.cli import main

    for module, name in ((strict_saddle, "strict_saddle"), (bn_ablation, "bn_ablation")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: pytest.fail("the work started"))
    folder = tmp_path / "results"
    os.mkfifo(folder)
    result = CliRunner().invoke(main, [*command, "-o", str(folder), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert stat.S_ISFIFO(os.lstat(folder).st_mode)


def test_strict_saddle_refuses_a_result_folder_holding_a_fifo_before_the_work(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from keras_embed.experiments import strict_saddle
    from keras_embed.tools.cli import main

    monkeypatch.setattr(strict_saddle, "strict_saddle", lambda **kwargs: pytest.fail("the work started"))
    folder = tmp_path / "results"
    folder.mkdir()
    os.mkfifo(folder / "spectra.png")  # savefig would have blocked on it, or written into a device
    result = CliRunner().invoke(main, ["experiment", "strict-saddle", "-o", str(folder), "--overwrite"])
    assert result.exit_code == 2 and "is a FIFO" in result.stderr, result.output
    assert list(kinds(folder).values()) == [stat.S_IFIFO]
# ---------------------------------------------------------------- issue 15: memory bombs in model and data files


L = keras.layers


def sequential(shape, make_layers, dtype="float32"):
    """A maker of Sequential(Input(shape), *make_layers())."""
    return lambda: keras.Sequential([keras.Input(shape, dtype=dtype), *make_layers()])


def attention_model():
    inputs = keras.Input((5, 6))
    x = L.Add()([L.MultiHeadAttention(2, 3)(inputs, inputs), L.GroupQueryAttention(4, 4, 2)(inputs, inputs)])
    x = L.AdditiveAttention()([L.Attention(use_scale=True, score_mode="concat")([x, inputs]), inputs])
    return keras.Model(inputs, L.EinsumDense("abc,cd->abd", (None, 3), bias_axes="d")(x))


STOCK_MODELS = {  # every entry of _LAYER_WEIGHTS appears in one of them
    "dense": sequential((8,), lambda: [L.Dense(4), L.BatchNormalization(), L.PReLU(), L.Dense(3)]),
    "convolutions": sequential((12, 12, 4), lambda: [
        L.Conv2D(4, 3, groups=2), L.DepthwiseConv2D(3, depth_multiplier=2), L.SeparableConv2D(5, 3),
        L.Conv2DTranspose(3, 3, strides=2), L.Flatten(), L.Dense(2)]),
    "1d-3d": sequential((6, 6, 6, 2), lambda: [
        L.Conv3D(3, 2), L.Conv3DTranspose(2, 2), L.Reshape((-1, 2)), L.Conv1D(3, 2), L.Conv1DTranspose(2, 2),
        L.SeparableConv1D(2, 2), L.DepthwiseConv1D(2), L.LayerNormalization(), L.GroupNormalization(2),
        L.RMSNormalization(), L.Normalization()]),
    "channels-first": sequential((3, 8, 8), lambda: [
        L.Conv2D(4, 3, data_format="channels_first"), L.BatchNormalization(axis=1)]),
    "recurrent": sequential((5, 4), lambda: [
        L.SimpleRNN(3, return_sequences=True), L.LSTM(3, return_sequences=True), L.GRU(3, return_sequences=True),
        L.Bidirectional(L.LSTM(2, return_sequences=True)), L.TimeDistributed(L.Dense(2)),
        L.RNN(L.StackedRNNCells([L.SimpleRNNCell(3), L.LSTMCell(3)]), return_sequences=True), L.RNN(L.GRUCell(2))]),
    "convolutional-recurrent": sequential((3, 6, 2), lambda: [
        L.ConvLSTM1D(2, 3, return_sequences=True), L.Reshape((3, 4, 1, 1, 2)),
        L.ConvLSTM3D(1, 1, return_sequences=True),
        L.Reshape((3, 2, 2, 1)), L.ConvLSTM2D(2, 1), L.Flatten(), L.Dense(1)]),
    "embedding": sequential((7,), lambda: [L.Embedding(50, 6), L.Flatten(), L.Dense(1)], dtype="int32"),
    "attention": attention_model,
}


@pytest.mark.parametrize("name", STOCK_MODELS)
def test_declared_weights_bound_what_keras_allocates_for_every_stock_weight_carrying_layer(name):
    model = STOCK_MODELS[name]()
    declared = declared_weights(model.to_json())
    assert model.count_params() <= declared <= 1.25 * model.count_params() + 8


def test_every_layer_the_weights_check_counts_is_in_a_stock_model_above():
    names = set()
    for make in STOCK_MODELS.values():
        names |= set(re.findall(r'"class_name": "(\w+)"', make().to_json()))
    assert set(_LAYER_WEIGHTS) <= names


def flatten_config(build_config):
    dense = {"class_name": "Dense", "config": {"name": "dense", "units": 2516}}
    if build_config:
        dense["build_config"] = {"input_shape": [None, 320_000]}
    return json.dumps({"class_name": "Sequential", "config": {"layers": [
        {"class_name": "InputLayer", "config": {"batch_shape": [None, 40_000, 8]}},
        {"class_name": "Flatten", "config": {"name": "flatten"}}, dense]}})


@pytest.mark.parametrize("build_config", [True, False])
def test_a_dense_after_a_flatten_counts_the_flattened_width(build_config):
    assert declared_weights(flatten_config(build_config)) == 320_001 * 2516


def test_declared_weights_read_the_parsed_config_however_it_is_spelled():
    """JSON escapes and repeated keys parse as Keras parses them: the last key wins."""
    escaped = ('{"class_name": "\\u0044ense", "config": {"units": 3, "units": 1000000000}, '
               '"build_config": {"input_shape": [null, 64]}}')
    assert declared_weights(escaped) == 65 * 10**9


def test_a_keras_archive_with_a_layer_without_build_config_is_refused_before_keras(tmp_path, monkeypatch):
    hostile.flattened_unbuilt(tmp_path / "model.keras", gibibytes=0.125)
    monkeypatch.setattr(keras.saving, "load_model", lambda *args, **options: pytest.fail("Keras was reached"))
    with pytest.raises(InputError, match="gives layer 'dense.*' no build_config"):
        load_model(tmp_path / "model.keras")


@pytest.mark.filterwarnings("ignore:You are saving a model that has not yet been built")
def test_an_unbuilt_model_without_any_build_config_still_loads(tmp_path):
    keras.Sequential([keras.layers.Dense(3)]).save(tmp_path / "unbuilt.keras")
    assert not load_model(tmp_path / "unbuilt.keras").built


def test_a_legacy_h5_cnn_passes_the_fallback_of_configs_without_build_config(tmp_path):
    model = keras.Sequential([keras.Input((32, 32, 3)), L.Conv2D(32, 3), L.Conv2D(64, 3, groups=2), L.MaxPooling2D(),
                              L.Flatten(), L.Dense(64), L.Dense(10)])
    model.save(tmp_path / "cnn.h5")
    assert load_model(tmp_path / "cnn.h5").count_params() == model.count_params()


def rezipped_members(path, extra=()):
    hostile.write_archive(path, [*hostile.widened_members(), *extra])


ARCHIVE_BOMBS = {  # small versions of the ulimit cases below: the guards look at ratios, not sizes
    "config padded past 16 MiB": (functools.partial(hostile.padded_config, gibibytes=0.125), "config.json, more than"),
    "config.json twice": (functools.partial(hostile.second_config, gibibytes=0.125), "'config.json' twice"),
    "config.json again as ./config.json": (
        functools.partial(rezipped_members, extra=[("./config.json", b"{}")]), "'./config.json' twice"),
    "weights member twice in other casing": (
        functools.partial(rezipped_members, extra=[("Model.Weights.H5", b"other weights")]), "twice"),
    "member sizes past the file": (functools.partial(hostile.lying_stored_size, gibibytes=0.125), "claim"),
    "weights zip bomb": (functools.partial(hostile.weights_bomb, gibibytes=0.125), "zip bomb"),
    "config zip bomb": (functools.partial(hostile.config_bomb, gibibytes=1 / 32), "config.json, more than"),
    "asset zip bomb": (lambda path: hostile.write_archive(path, hostile.widened_members(), [
        ("assets/vocabulary.txt", hostile.deflated_repeats(b"", b"a" * hostile.MiB, 64), 64 * hostile.MiB)]),
        "'assets/vocabulary.txt' that inflates"),
    "hollow HDF5 weights": (functools.partial(hostile.hollow_weights, gibibytes=0.125), "declaring 134217728 bytes"),
    "huge Conv2D": (hostile.huge_conv2d(gibibytes=0.125), "declares"),
    "huge Embedding": (hostile.huge_embedding(gibibytes=0.125), "declares"),
}


@pytest.mark.parametrize("name", ARCHIVE_BOMBS)
def test_archive_bombs_are_refused_before_keras_reads_them(tmp_path, monkeypatch, name):
    make, message = ARCHIVE_BOMBS[name]
    make(tmp_path / "model.keras")
    monkeypatch.setattr(keras.saving, "load_model", lambda *args, **options: pytest.fail("Keras was reached"))
    with pytest.raises(InputError, match=re.escape(message)):
        load_model(tmp_path / "model.keras")


def test_an_h5_config_declaring_a_huge_dense_after_a_flatten_is_refused_before_keras(tmp_path, monkeypatch):
    hostile.flattened_h5(tmp_path / "model.h5", gibibytes=0.125)
    monkeypatch.setattr(keras.saving, "load_model", lambda *args, **options: pytest.fail("Keras was reached"))
    with pytest.raises(InputError, match="declares 33.* weights but stores only"):
        load_model(tmp_path / "model.h5")


def test_a_legacy_h5_whose_weights_store_far_less_than_they_declare_is_refused_before_keras(tmp_path, monkeypatch):
    hostile.hollow_h5(tmp_path / "model.h5", gibibytes=0.125)
    monkeypatch.setattr(keras.saving, "load_model", lambda *args, **options: pytest.fail("Keras was reached"))
    with pytest.raises(InputError, match="weights declaring 134217728 bytes more than they store"):
        load_model(tmp_path / "model.h5")


def test_zipfile_stops_inflating_a_member_at_its_declared_size(tmp_path):
    """What the guards rely on: a member declaring 1 MiB that would inflate to 64 MiB
    yields 1 MiB, then a CRC error; zipfile never returns more than is declared."""
    path = tmp_path / "lying.zip"
    hostile.write_archive(path, [], [("member", hostile.deflated_repeats(b"", bytes(hostile.MiB), 64), hostile.MiB)])
    inflated = 0
    with zipfile.ZipFile(path) as archive, archive.open("member") as member:
        with pytest.raises(zipfile.BadZipFile, match="CRC"):
            while chunk := member.read(2**16):
                inflated += len(chunk)
    assert hostile.MiB - 2**16 <= inflated < hostile.MiB  # the last piece raised instead


def test_a_deflated_copy_of_a_real_model_still_loads(tmp_path):
    with zipfile.ZipFile(tmp_path / "model.keras", "w", zipfile.ZIP_DEFLATED) as target:
        for name, content in hostile.widened_members():
            target.writestr(name, content)
    assert load_model(tmp_path / "model.keras").count_params() == load_model(WIDENED).count_params()


SPEC = Node("x", "InputLayer", (), {"dtype": "float32"}, shape=(64,))  # a graph input: its shape and dtype
ROWS = np.random.default_rng(0).uniform(0, 1, (300, 64))


@pytest.mark.parametrize("save", [np.save, lambda path, x: np.savez(path, x=x, y=np.arange(len(x)))])
def test_npy_files_and_stored_npz_members_are_memory_mapped(tmp_path, save):
    path = tmp_path / ("x.npy" if save is np.save else "x.npz")
    save(path, ROWS)
    x, y = load_data(path)
    assert isinstance(x, np.memmap) and not x.flags.writeable
    np.testing.assert_array_equal(x, ROWS)
    assert y is None if save is np.save else np.array_equal(y, np.arange(300))


def test_a_compressed_npz_member_is_inflated_into_memory(tmp_path):
    np.savez_compressed(tmp_path / "x.npz", x=ROWS)
    x, _ = load_data(tmp_path / "x.npz")
    assert type(x) is np.ndarray and np.array_equal(x, ROWS)


def test_mapped_data_of_another_dtype_is_cast_batch_by_batch(tmp_path):
    np.save(tmp_path / "x.npy", ROWS)  # float64 for a float32 model
    x = check_inputs(load_data(tmp_path / "x.npy")[0], SPEC)
    assert isinstance(x, LazyCast) and x.shape == (300, 64) and len(x) == 300
    assert [batch.dtype for batch in batches(x, 256)] == ["float32", "float32"]
    np.testing.assert_array_equal(np.asarray(x), ROWS.astype("float32"))
    assert check_inputs(x, Node("x", "InputLayer", (), {"dtype": "float64"}, shape=(64,))).dtype == "float64"  # recast from the file, not twice
    np.save(tmp_path / "same.npy", ROWS.astype("float32"))
    assert isinstance(check_inputs(load_data(tmp_path / "same.npy")[0], SPEC), np.memmap)


def test_checking_and_batching_mapped_data_holds_one_piece_at_a_time(tmp_path):
    """32 MiB of float64 rows for a float32 model: reading, checking and one pass over
    the batches allocate at most a piece (16 MiB), not the data or its cast copy."""
    rows = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype="float64", shape=(65_536, 64))
    rows[:] = 0.5
    del rows
    tracemalloc.start()
    try:
        x = check_inputs(load_data(tmp_path / "x.npy")[0], SPEC)
        assert sum(len(batch) for batch in batches(x, 4096)) == 65_536
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * hostile.MiB


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_bad_value_in_the_last_piece_of_mapped_data_is_found(tmp_path, monkeypatch, value):
    monkeypatch.setattr(data_module, "_CHUNK_BYTES", 1024)  # 4 rows a piece
    rows = ROWS.copy()
    rows[-1, -1] = value
    np.save(tmp_path / "x.npy", rows)
    with pytest.raises(InputError, match="NaN or infinite"):
        check_inputs(load_data(tmp_path / "x.npy")[0], SPEC)


def damaged_stored_npz(path):
    np.savez(path, x=ROWS)
    content = bytearray(path.read_bytes())
    content[content.index(b"x.npy") + 400] ^= 0xFF  # a value byte of the stored member
    path.write_bytes(bytes(content))


DATA_BOMBS = {
    "npz zip bomb": (functools.partial(hostile.npz_bomb, gibibytes=0.5), "compressed, inflating to 536870912 bytes"),
    "npz header declaring 10^12 rows": (hostile.npz_lying_header, "declares a (1000000000000, 64) float32 array"),
    "npy header declaring 10^12 rows": (hostile.npy_lying_header, "declares a (1000000000000, 64) float32 array"),
    "damaged stored npz member": (damaged_stored_npz, "Bad CRC-32"),
}


@pytest.mark.parametrize("name", DATA_BOMBS)
def test_data_bombs_are_refused_before_anything_is_allocated(tmp_path, name):
    make, message = DATA_BOMBS[name]
    path = tmp_path / ("data.npy" if "npy" in name else "data.npz")
    make(path)
    start = time.monotonic()
    with pytest.raises(InputError, match=re.escape(message)):
        load_data(path)
    assert time.monotonic() - start < 5


ADDRESS_SPACE = 4_000_000 * 1024  # ulimit -v 4000000: TensorFlow imports under it
MODEL_BOMBS = {  # what would make Keras allocate 3+ GB without the guards
    "padded-config": (hostile.padded_config, "model.keras", "config.json, more than"),
    "second-config": (hostile.second_config, "model.keras", "'config.json' twice"),
    "flattened-unbuilt": (hostile.flattened_unbuilt, "model.keras", "no build_config"),
    "flattened-h5": (hostile.flattened_h5, "model.h5", "declares"),
    "huge-conv2d": (hostile.huge_conv2d(), "model.keras", "declares"),
    "huge-embedding": (hostile.huge_embedding(), "model.keras", "declares"),
    "member-sizes-past-the-file": (hostile.lying_stored_size, "model.keras", "claim"),
    "weights-zip-bomb": (hostile.weights_bomb, "model.keras", "zip bomb"),
    "hollow-weights": (hostile.hollow_weights, "model.keras", "more than they store"),
    "hollow-h5": (hostile.hollow_h5, "model.h5", "more than they store"),
    "config-zip-bomb": (hostile.config_bomb, "model.keras", "config.json, more than"),
}
DATA_FILE_BOMBS = {  # what would make numpy allocate 3+ GB without the guards, and a file too large to map
    "npz-zip-bomb": (hostile.npz_bomb, "data.npz", "compressed"),
    "npz-header-lies": (hostile.npz_lying_header, "data.npz", "declares"),
    "npy-header-lies": (hostile.npy_lying_header, "data.npy", "declares"),
    "npy-too-large-to-map": (hostile.sparse_npy, "data.npy", "cannot be memory-mapped"),  # valid, but 3 GiB
}
UNDER_A_LIMIT = """
import json, sys
from click.testing import CliRunner
from keras_embed.tools.cli import main
results = {}
for name, args in json.loads(sys.argv[1]).items():
    result = CliRunner().invoke(main, args, prog_name="keras-embed")
    results[name] = [result.exit_code, result.stdout, result.stderr]
print(json.dumps(results))
"""


def limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.fixture(scope="module")
def runs_under_4_gb(tmp_path_factory):
    """Every hostile file above through `keras-embed prune` in one child process whose
    address space is limited to 4 GB (one TensorFlow start-up), plus a valid run."""
    folder = tmp_path_factory.mktemp("bombs")
    runs = {}
    for name, (make, file_name, _) in {**MODEL_BOMBS, **DATA_FILE_BOMBS}.items():
        (folder / name).mkdir()
        make(folder / name / file_name)
        model = folder / name / file_name if name in MODEL_BOMBS else WIDENED
        data = ["--data", str(folder / name / file_name)] if name in DATA_FILE_BOMBS else []
        runs[name] = ["prune", str(model), "-o", str(folder / name / "out.keras"), *data]
    np.save(folder / "valid.npy", ROWS.astype("float32"))
    runs["valid"] = ["prune", str(WIDENED), "-o", str(folder / "valid.keras"), "--data", str(folder / "valid.npy")]
    done = subprocess.run([sys.executable, "-c", UNDER_A_LIMIT, json.dumps(runs)], capture_output=True, text=True,
                          preexec_fn=limit_address_space, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [*MODEL_BOMBS, *DATA_FILE_BOMBS])
def test_hostile_files_are_refused_in_one_line_under_a_4_gb_address_space(runs_under_4_gb, name):
    folder, results = runs_under_4_gb
    code, stdout, stderr = results[name]
    mention = {**MODEL_BOMBS, **DATA_FILE_BOMBS}[name][2]
    assert code == 2 and stdout == "", (code, stderr)
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("keras-embed: error: ") and mention in stderr
    assert not (folder / name / "out.keras").exists()


def test_a_valid_prune_runs_under_the_same_limit(runs_under_4_gb):
    folder, results = runs_under_4_gb
    assert results["valid"][0] == 0, results["valid"][2]
    assert (folder / "valid.keras").exists()


def test_the_tf_keras_child_refuses_the_same_code_layers_as_the_parent_check():
    """The child script imports nothing from keras_embed, so it keeps its own copy of the list."""
    from keras_embed.files import tf_keras_child, tf_keras_code

    layers = {name: what for name, what in tf_keras_code.CODE_CLASSES.items() if name != "__lambda__"}
    assert tf_keras_child.CODE_LAYERS == layers
