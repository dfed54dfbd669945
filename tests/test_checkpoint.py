"""Tests for advmaml.io.checkpoint: round trips, pruning, crash safety, and that
malicious or damaged files are refused without running anything."""

import collections
import hashlib
import json
import os
import pathlib
import pickle
import pickletools

import jax.numpy as jnp
import numpy as np
import pytest

from advmaml.io import checkpoint as ckpt

# Records calls made by `_record`; a refused payload must leave it empty.
SIDE_EFFECTS = []


def _record(value):
  SIDE_EFFECTS.append(value)
  return value


class _ShellPayload:
  """Pickles as a call to os.system creating `marker`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _RecordPayload:
  """Pickles as a call to a test-module function with a side effect."""

  def __reduce__(self):
    return (_record, ("pwned",))


class _EvalPayload:
  """Pickles as builtins.eval of an expression that would create a file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (eval, (f"open({str(self.marker)!r}, 'w')",))


class _ForgedDtype:
  """A float64 dtype whose pickled state claims it holds Python objects.

  Plain pickle would apply that state and then read the array's raw bytes
  as object pointers.
  """

  def __reduce__(self):
    return (np.dtype, ("f8", False, True),
            (3, "<", None, None, None, -1, -1, 0x3F))


class _ForgedArray:
  def __reduce__(self):
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's own _reconstruct.
    return (reconstruct, (np.ndarray, (0,), b"b"),
            (1, (2,), _ForgedDtype(), False, b"\x00" * 16))


def _sample_tree():
  return {
      "params": {
          "w": np.arange(12, dtype=np.float32).reshape(3, 4),
          "b": np.array([-1, 0, 7], dtype=np.int32),
          "mask": np.array([[True, False]], dtype=np.bool_),
          "fortran": np.asfortranarray(np.ones((2, 3), np.float64)),
          "empty": np.zeros((0, 5), np.float32),
          "complex": np.array([1 + 2j], np.complex64),
      },
      "scalars": (np.float32(1.5), np.int64(-3), np.bool_(True), np.uint8(255),
                  np.array(0.5, jnp.bfloat16)[()]),
      "python": [1, 2.5, True, "text", None, (), []],
      "jax": {"x": jnp.arange(4, dtype=jnp.float32),
              "i": jnp.array(3, jnp.int32),
              "bf16": jnp.ones((2,), jnp.bfloat16)},
  }


def _assert_same(actual, expected, path="state"):
  """Exact structural equality; jax arrays are expected back as numpy."""
  if isinstance(expected, jnp.ndarray):
    expected = np.asarray(expected)
  assert type(actual) is type(expected), path
  if isinstance(expected, dict):
    assert list(actual) == list(expected), path
    for key in expected:
      _assert_same(actual[key], expected[key], f"{path}[{key!r}]")
  elif isinstance(expected, (list, tuple)):
    assert len(actual) == len(expected), path
    for i, (a, e) in enumerate(zip(actual, expected)):
      _assert_same(a, e, f"{path}[{i}]")
  elif isinstance(expected, (np.ndarray, np.generic)):
    assert actual.dtype == expected.dtype, path
    assert np.shape(actual) == np.shape(expected), path
    np.testing.assert_array_equal(actual, expected, err_msg=path)
  else:
    assert actual == expected, path


def _write_state(folder, data, with_metadata=True, step=None):
  """Writes raw `data` as a checkpoint (optionally with matching metadata)."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "state.pkl").write_bytes(data)
  if with_metadata:
    (folder / "metadata.json").write_text(json.dumps({
        "step": int(folder.name) if step is None else step,
        "format_version": 1, "sha256": hashlib.sha256(data).hexdigest(),
        "nbytes": len(data), "time": 0.0}))


def _truncate(state_file):
  data = state_file.read_bytes()
  state_file.write_bytes(data[:len(data) // 2])


# --- round trips ------------------------------------------------------------


def test_round_trip_nested_tree_with_jax_arrays(tmp_path):
  tree = _sample_tree()
  folder = ckpt.save_checkpoint(tmp_path, 7, tree)
  assert folder == tmp_path / "7"

  step, restored = ckpt.load_checkpoint(folder)
  assert step == 7
  _assert_same(restored, tree)
  assert restored["params"]["fortran"].flags.f_contiguous
  # Restored arrays are ordinary writable numpy arrays.
  restored["params"]["w"][0, 0] = 99.0

  # A path to the state file works too.
  step, again = ckpt.load_checkpoint(folder / "state.pkl")
  assert step == 7
  _assert_same(again, tree)


def test_metadata_describes_state_file_and_no_out_of_band_buffers(tmp_path):
  folder = ckpt.save_checkpoint(tmp_path, 3, _sample_tree())
  data = (folder / "state.pkl").read_bytes()
  meta = json.loads((folder / "metadata.json").read_text())
  assert meta["step"] == 3
  assert meta["format_version"] == ckpt.FORMAT_VERSION
  assert meta["nbytes"] == len(data)
  assert meta["sha256"] == hashlib.sha256(data).hexdigest()
  assert isinstance(meta["time"], float)
  opcodes = {op.name for op, _, _ in pickletools.genops(data)}
  assert not opcodes & {"NEXT_BUFFER", "READONLY_BUFFER"}


def test_big_endian_array_round_trips_by_value(tmp_path):
  array = np.arange(5, dtype=">i4")
  ckpt.save_checkpoint(tmp_path, 0, {"a": array})
  _, restored = ckpt.load_checkpoint(tmp_path / "0")
  np.testing.assert_array_equal(restored["a"], array)
  assert restored["a"].dtype.kind == "i" and restored["a"].dtype.itemsize == 4


def test_numpy1_module_names_load():
  tree = {"a": np.arange(3, dtype=np.float32), "s": np.float32(2.0)}
  # Protocol 3 spells globals as text, so the module can be renamed in place.
  data = pickle.dumps(tree, protocol=3)
  assert b"numpy._core.multiarray" in data
  old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  _assert_same(ckpt.safe_loads(old), tree)


def test_save_replaces_existing_step(tmp_path):
  ckpt.save_checkpoint(tmp_path, 5, {"v": 1})
  ckpt.save_checkpoint(tmp_path, 5, {"v": 2})
  assert ckpt.load_checkpoint(tmp_path / "5") == (5, {"v": 2})
  assert [p.name for p in tmp_path.iterdir()] == ["5"]


# --- listing, pruning, crash safety ----------------------------------------


def test_keep_prunes_to_newest(tmp_path):
  for step in (10, 20, 30, 40):
    ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
  assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 40]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["30", "40"]


def test_keep_never_prunes_the_step_just_saved(tmp_path):
  for step in (10, 20, 5):
    ckpt.save_checkpoint(tmp_path, step, {}, keep=2)
  assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5, 20]


def test_keep_none_keeps_everything(tmp_path):
  for step in range(5):
    ckpt.save_checkpoint(tmp_path, step, {}, keep=None)
  assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [0, 1, 2, 3, 4]


def test_list_ignores_temp_and_other_names(tmp_path):
  ckpt.save_checkpoint(tmp_path, 2, {"x": 1})
  ckpt.save_checkpoint(tmp_path, 11, {"x": 2})
  _write_state(tmp_path / ".tmp-99-abc", b"junk", with_metadata=False)
  _write_state(tmp_path / "best", b"junk", with_metadata=False)
  (tmp_path / "12").write_text("a file, not a folder")
  (tmp_path / "13").mkdir()  # Incomplete: no state file.
  assert ckpt.list_checkpoints(tmp_path) == [
      (2, tmp_path / "2"), (11, tmp_path / "11")]
  assert ckpt.list_checkpoints(tmp_path / "missing") == []


def test_leftover_temp_folder_is_ignored_then_cleaned(tmp_path):
  ckpt.save_checkpoint(tmp_path, 5, {"good": True})
  # A crash after writing but before the rename leaves a complete-looking
  # newer checkpoint in a temp folder; it must not be restored.
  leftover = tmp_path / ".tmp-9-deadbeef"
  _write_state(leftover, pickle.dumps({"good": False}), step=9)
  assert ckpt.list_checkpoints(tmp_path) == [(5, tmp_path / "5")]
  assert ckpt.restore_latest(tmp_path) == (5, {"good": True})

  ckpt.save_checkpoint(tmp_path, 6, {"good": True})
  assert not leftover.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["5", "6"]


def test_restore_latest_none_without_checkpoints(tmp_path):
  assert ckpt.restore_latest(tmp_path / "missing") is None
  assert ckpt.restore_latest(tmp_path) is None
  (tmp_path / ".tmp-3-x").mkdir()
  assert ckpt.restore_latest(tmp_path) is None


# --- refusing unsafe files --------------------------------------------------


@pytest.mark.parametrize("make_payload, refused", [
    (lambda marker: _ShellPayload(marker), "system'"),
    (lambda marker: _EvalPayload(marker), "refused global 'builtins.eval'"),
    (lambda marker: _RecordPayload(), "_record'"),
    # Hidden inside an otherwise valid tree.
    (lambda marker: {"w": np.ones(3), "opt": [_ShellPayload(marker)]},
     "system'"),
])
def test_code_payload_is_refused_without_running(tmp_path, make_payload,
                                                 refused):
  marker = tmp_path / "pwned"
  data = pickle.dumps(make_payload(marker), protocol=4)
  # Matching metadata: a valid checksum does not make a file trusted.
  _write_state(tmp_path / "ckpt" / "1", data)

  with pytest.raises(ckpt.CheckpointError) as info:
    ckpt.load_checkpoint(tmp_path / "ckpt" / "1")
  message = str(info.value)
  assert "refused global" in message and refused in message
  assert "state.pkl" in message
  assert not marker.exists()
  assert not SIDE_EFFECTS


def test_object_dtype_array_is_refused():
  data = pickle.dumps({"a": np.array([1, "x", None], dtype=object)})
  with pytest.raises(ckpt.CheckpointError, match="object"):
    ckpt.safe_loads(data)


def test_forged_object_flags_on_numeric_dtype_are_refused():
  with pytest.raises(ckpt.CheckpointError, match="refused dtype state"):
    ckpt.safe_loads(pickle.dumps(_ForgedArray(), protocol=4))


@pytest.mark.parametrize("value", [
    np.array(["a", "b"]),  # Unicode array: not numeric.
    np.zeros(2, dtype=[("x", "f4")]),  # Structured array.
    collections.OrderedDict(a=1),  # Dict subclass pickles as a global.
])
def test_non_numeric_numpy_and_container_subclasses_refused_on_load(value):
  with pytest.raises(ckpt.CheckpointError, match="refused"):
    ckpt.safe_loads(pickle.dumps(value, protocol=4))


def test_out_of_band_buffers_are_refused():
  buffers = []
  data = pickle.dumps(np.ones(4), protocol=5, buffer_callback=buffers.append)
  assert buffers
  with pytest.raises(ckpt.CheckpointError):
    ckpt.safe_loads(data)


# --- damaged files and fallback --------------------------------------------


def test_without_metadata_is_refused_unless_trusted_and_then_still_checked(tmp_path):
  folder = ckpt.save_checkpoint(tmp_path, 4, _sample_tree())
  (folder / "metadata.json").unlink()
  with pytest.raises(ckpt.CheckpointError, match="no metadata.json .* refused.*--trust_unverified"):
    ckpt.load_checkpoint(folder)
  assert ckpt.load_checkpoint(folder, trust_unverified=True)[0] == 4
  _truncate(folder / "state.pkl")
  with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
    ckpt.load_checkpoint(folder, trust_unverified=True)


def test_truncated_with_metadata_is_corrupt(tmp_path):
  folder = ckpt.save_checkpoint(tmp_path, 4, _sample_tree())
  _truncate(folder / "state.pkl")
  with pytest.raises(ckpt.CheckpointError,
                     match=r"state\.pkl: checkpoint is truncated or corrupt"):
    ckpt.load_checkpoint(folder)


def test_bit_flip_fails_checksum(tmp_path):
  folder = ckpt.save_checkpoint(tmp_path, 4, {"w": np.zeros(64, np.float32)})
  data = bytearray((folder / "state.pkl").read_bytes())
  data[-20] ^= 0xFF
  (folder / "state.pkl").write_bytes(bytes(data))
  with pytest.raises(ckpt.CheckpointError, match="sha256"):
    ckpt.load_checkpoint(folder)


@pytest.mark.parametrize("keep_metadata", [True, False])
def test_restore_latest_falls_back_and_warns(tmp_path, caplog, keep_metadata):
  trees = {step: {"step": step, "w": np.full(3, step, np.float32)}
           for step in (1, 2, 3)}
  for step, tree in trees.items():
    ckpt.save_checkpoint(tmp_path, step, tree)
  if not keep_metadata:
    (tmp_path / "3" / "metadata.json").unlink()
  _truncate(tmp_path / "3" / "state.pkl")

  step, tree = ckpt.restore_latest(tmp_path, trust_unverified=not keep_metadata)
  assert step == 2
  _assert_same(tree, trees[2])
  warnings = [r for r in caplog.records if r.levelname == "WARNING"
              and "Skipping" in r.getMessage()]
  assert len(warnings) == 1
  assert str(tmp_path / "3") in warnings[0].getMessage()
  assert "truncated or corrupt" in warnings[0].getMessage()


def test_restore_latest_raises_when_all_bad(tmp_path, caplog):
  for step in (1, 2):
    ckpt.save_checkpoint(tmp_path, step, {"step": step})
    _truncate(tmp_path / str(step) / "state.pkl")
  (tmp_path / "5").mkdir()  # Incomplete folders count as bad, not absent.
  with pytest.raises(ckpt.CheckpointError, match="none of the 3"):
    ckpt.restore_latest(tmp_path)
  assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 3


def test_newer_format_version_is_refused(tmp_path):
  folder = ckpt.save_checkpoint(tmp_path, 1, {})
  meta = json.loads((folder / "metadata.json").read_text())
  meta["format_version"] = ckpt.FORMAT_VERSION + 1
  (folder / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(ckpt.CheckpointError, match="upgrade"):
    ckpt.load_checkpoint(folder)


# --- refusing unsupported trees at save time -------------------------------

_AdamState = collections.namedtuple("ScaleByAdamState", ["mu", "nu"])


class _Custom:
  pass


@pytest.mark.parametrize("tree, expected", [
    ({"opt_state": [_AdamState(np.zeros(2), np.zeros(2))]},
     "state['opt_state'][0]: ScaleByAdamState is not allowed; convert to "
     "plain containers"),
    ({"a": (1, _Custom())}, "state['a'][1]: _Custom is not allowed"),
    ({"a": np.array([object()])}, "state['a']: numpy array with dtype object"),
    ([np.array(["s"])], "state[0]: numpy array with dtype <U1"),
    ({1: 2}, "state: dict key 1 (int) is not allowed"),
    (collections.OrderedDict(a=1), "state: OrderedDict is not allowed"),
])
def test_save_refuses_unsupported_values(tmp_path, tree, expected):
  with pytest.raises(TypeError) as info:
    ckpt.save_checkpoint(tmp_path / "ckpt", 1, tree)
  assert expected in str(info.value)
  assert not (tmp_path / "ckpt").exists()


def test_save_refuses_reference_cycle(tmp_path):
  loop = []
  loop.append(loop)
  with pytest.raises(TypeError, match="cycle"):
    ckpt.save_checkpoint(tmp_path, 1, {"loop": loop})


def test_special_files_are_refused_without_blocking(tmp_path):
  """A FIFO would block open() and read() forever; /dev/zero would never end."""
  import threading
  folder = ckpt.save_checkpoint(tmp_path, 3, _sample_tree())
  (folder / "state.pkl").unlink()
  os.mkfifo(folder / "state.pkl")
  errors = []
  reader = threading.Thread(target=lambda: errors.append(_error_of(ckpt.load_checkpoint, folder)),
                            daemon=True)
  reader.start()
  reader.join(timeout=20)
  assert not reader.is_alive(), "reading a FIFO checkpoint hung"
  assert "is a FIFO, not a regular file" in errors[0]
  (folder / "state.pkl").unlink()
  (folder / "state.pkl").symlink_to("/dev/zero")
  assert "symbolic link" in _error_of(ckpt.load_checkpoint, folder)
  os.unlink(folder / "state.pkl")
  os.truncate(folder / "metadata.json", 0)
  with open(folder / "metadata.json", "wb") as f:
    f.truncate(ckpt._MAX_METADATA_BYTES + 1)
  (folder / "state.pkl").write_bytes(b"x")
  assert "more than" in _error_of(ckpt.load_checkpoint, folder)


def _error_of(fn, *args) -> str:
  try:
    fn(*args)
  except ckpt.CheckpointError as e:
    return str(e)
  return "no error"
