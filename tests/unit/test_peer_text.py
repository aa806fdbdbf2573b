"""What the other host sends is bounded and harmless before it is kept or printed: its protocol
lines (size, nesting), its stderr tail, and the text printed from it (a received spec's volumes:
test_spec.py, test_agent.py)."""

import subprocess

import pytest

from migrate import output, ssh
from runtime.errors import PeerLost


def peer(tmp_path, stdout: bytes, stderr: bytes = b"", status: int = 1) -> subprocess.Popen:
    """A real process that writes STDOUT and STDERR, then exits with STATUS (as an agent would)."""
    (tmp_path / "out").write_bytes(stdout)
    (tmp_path / "err").write_bytes(stderr)
    return subprocess.Popen(["sh", "-c", f'cat "$1"; cat "$2" >&2; exit {status}', "sh",
                             str(tmp_path / "out"), str(tmp_path / "err")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_line_past_the_limit_is_a_protocol_error_and_is_never_held_whole(monkeypatch, tmp_path):
    monkeypatch.setattr(ssh, "MAX_LINE", 1000)
    proc = ssh.RemoteProcess(peer(tmp_path, b'{"id": 1}\n' + b"x" * 50_000 + b'\n{"id": 2}\n'), "the agent")
    assert proc.recv(5) == {"id": 1}
    with pytest.raises(PeerLost, match=r"^the agent sent a line longer than 1000 bytes: not a message of the protocol"):
        proc.recv(5)
    assert proc.recv(5) == {"id": 2}  # what follows the long line is read as it comes: the caller gives up
    proc.close()


def test_a_line_nested_deeper_than_the_parser_goes_is_a_protocol_error(tmp_path):
    proc = ssh.RemoteProcess(peer(tmp_path, b"[" * 200_000 + b"\n"), "the agent")
    with pytest.raises(PeerLost, match="not JSON"):
        proc.recv(5)
    proc.close()


def test_the_stderr_tail_keeps_a_bounded_start_of_each_line(tmp_path):
    proc = ssh.RemoteProcess(peer(tmp_path, b"", b"noise\n" + b"e" * 100_000 + b"\n"), "the agent")
    with pytest.raises(PeerLost) as e:
        proc.recv(5)
    assert str(e.value) == "the agent exited (status 1): " + "e" * 1000
    proc.close()


@pytest.mark.parametrize("raw,shown", [
    ("plain text, tab\tand\nnewline", "plain text, tab\tand\nnewline"),
    ("\x1b[31mred\x1b[0m \x1b[2J\x1b[1;1Hclear", "red clear"),
    ("\x1b]0;new title\x07title", "title"),
    ("\x1b]8;;http://evil.example/\x1b\\link\x1b]8;;\x1b\\", "link"),
    ("\x1bP1$r...\x1b\\dcs", "dcs"),
    ("\x9b31m8-bit csi\x9d0;t\x9c", "8-bit csi"),
    ("bell\x07 bs\x08 cr\r del\x7f esc\x1b7 nul\x00", "bell bs cr del esc nul"),
    ("ünïcödé ✓", "ünïcödé ✓"),
])
def test_printable_strips_terminal_escapes_and_controls(raw, shown):
    assert output.printable(raw) == shown


def test_errors_and_notes_from_another_host_are_printed_without_escapes(capsys):
    output.print_error("host-b: boom\x1b]0;owned\x07\x1b[2K")
    output.print_note("\x1b[31mred\x1b[0m")
    output.print_table(("A",), [("\x1b[1m[bold]x\x1b[0m",)])
    captured = capsys.readouterr()
    assert captured.err == "migrate: error: host-b: boom\nmigrate: note: red\n"
    assert "\x1b" not in captured.out and "[bold]x" in captured.out
