"""What a container holds, decided from /proc's text: connections, credentials, open databases."""

import os
import socket

from runtime import procfs
from runtime.snapshots import irmap_scan_paths

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0
   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 101 1 0
   2: 0100007F:D2F0 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 102 1 0
   3: 0100007F:1F90 0A00000A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 103 1 0
   4: 0100007F:1F90 0100007F:E000 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0
"""
TCP6 = """  sl  local_address                         remote_address                        st tx_queue ...
   0: 00000000000000000000000001000000:0016 00000000000000000000000001000000:B000 01 0:0 0:0 0 0 0 200 1
   1: 0000000000000000FFFF00000100007F:0050 0000000000000000FFFF00000A0A0A0A:C000 01 0:0 0:0 0 0 0 201 1
"""


def test_tcp_tables_parse_to_addresses_and_states():
    rows = procfs.parse_tcp_table(TCP)
    assert rows[0] == procfs.TcpSocket(("127.0.0.1", 8080), ("0.0.0.0", 0), procfs.TCP_LISTEN, 100)
    assert rows[3].remote == ("10.0.0.10", 40000)
    v6 = procfs.parse_tcp_table(TCP6)
    assert v6[0].local == ("::1", 22) and v6[0].remote == ("::1", 45056)
    assert v6[1].local == ("127.0.0.1", 80) and v6[1].remote == ("10.10.10.10", 49152)  # v4-mapped


def test_connections_between_the_containers_own_processes_are_not_outside():
    table = procfs.parse_tcp_table(TCP)
    # 101 <-> 102 is a loopback pair inside; 103's peer is another machine; 0 is an accept queue
    found = procfs.outside_connections(table, ours={100, 101, 102, 103})
    assert [str(c) for c in found] == ["127.0.0.1:8080 -> 10.0.0.10:40000"]
    # one end of the loopback pair outside the container: the other end is a connection out
    found = procfs.outside_connections(table, ours={101})
    assert [str(c) for c in found] == ["127.0.0.1:8080 -> 127.0.0.1:54000"]
    v6 = procfs.outside_connections(procfs.parse_tcp_table(TCP6), ours={200})
    assert [str(c) for c in v6] == ["[::1]:22 -> [::1]:45056"]


def test_socket_inodes_come_from_fd_links():
    assert procfs.socket_inodes(["socket:[12]", "pipe:[13]", "/dev/null", "socket:[7]"]) == {7, 12}


def test_a_live_connection_to_another_process_is_found_and_an_own_pair_is_not():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as a:
            b, _ = listener.accept()
            with b:
                assert procfs.connections_to_outside([os.getpid()]) == []
                # as seen from a container holding only `b`: its peer `a` is outside
                ours_b = {os.fstat(b.fileno()).st_ino}
                table = procfs.parse_tcp_table(open("/proc/self/net/tcp").read())
                found = procfs.outside_connections(table, ours_b)
                assert [c.local for c in found] == [b.getsockname()] and found[0].remote == a.getsockname()


def test_ids_and_capabilities_from_status():
    status = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t0\t0\t0\t0\nCapEff:\t000001fffeffffff\n"
    assert procfs.ids_from_status(status) == {0, 1000}
    assert not procfs.has_capability(status, procfs.CAP_SYS_RESOURCE)
    assert procfs.has_capability(status.replace("fffeffffff", "ffffffffff"), procfs.CAP_SYS_RESOURCE)
    assert procfs.foreign_ids([os.getpid()]) == ({os.getuid(), os.getgid()} - {0})


def test_root_mount_and_fdinfo():
    mountinfo = ("22 1 0:20 / / rw - ext4 /dev/vda rw\n30 22 0:5 / /proc rw - proc proc rw\n"
                 "41 22 0:40 / / rw - overlay overlay rw\n")
    assert procfs.root_mount_id(mountinfo) == 41
    assert procfs.fdinfo_fields("pos:\t0\nflags:\t0100002\nmnt_id:\t41\nino:\t5\n") == (0o100002, 41)


def test_open_sqlite_databases_are_found_by_their_header(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "app.db")
    db.execute("CREATE TABLE t (x)")
    db.commit()
    with open(tmp_path / "plain.txt", "w") as other:
        other.write("hello")
        other.flush()
        found = procfs.open_databases([os.getpid()])
    db.close()
    # this test's root is the machine's own: the database counts when it lies on the root mount
    on_root = os.stat(tmp_path).st_dev == os.stat("/").st_dev
    assert found == ([str(tmp_path / "app.db")] if on_root else [])
    assert str(tmp_path / "plain.txt") not in found


def test_irmap_scans_the_top_folders_but_not_the_kernels(tmp_path):
    for d in ("etc", "proc", "sys", "dev", "srv"):
        (tmp_path / d).mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to("etc")
    assert irmap_scan_paths(tmp_path) == ("/etc", "/srv")
    assert irmap_scan_paths(tmp_path / "missing") == ()


UDP = """   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref
 9462: 0100007F:1B5A 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 300 2 0 0
 9463: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 301 2 0 0
 9464: 0100007F:9000 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 302 2 0 0
"""


def test_bound_ports_are_listeners_and_unconnected_udp():
    tables = {"tcp": procfs.parse_tcp_table(TCP), "udp": procfs.parse_tcp_table(UDP)}
    ports = procfs.bound_ports(tables, ours={100, 101, 300, 302})
    assert [str(p) for p in ports] == ["tcp 127.0.0.1:8080", "udp 127.0.0.1:7002"]
    assert procfs.Port.from_json(ports[0].to_json()) == ports[0]


def test_port_clashes_on_the_same_port_and_overlapping_addresses():
    tables = {"tcp": procfs.parse_tcp_table(TCP), "udp": procfs.parse_tcp_table(UDP)}
    P = procfs.Port
    wanted = [P("tcp", "127.0.0.1", 8080), P("tcp", "10.0.0.1", 8080), P("tcp", "127.0.0.2", 8080),
              P("tcp", "0.0.0.0", 8080), P("tcp", "127.0.0.1", 8081), P("udp", "127.0.0.1", 53),
              P("udp", "127.0.0.1", 7002), P("tcp", "127.0.0.1", 53)]
    clashes = procfs.port_clashes(wanted, tables)
    # 8080 is listened on 127.0.0.1 there; udp 53 on any address; tcp 53 is free
    assert [str(p) for p in clashes] == ["tcp 127.0.0.1:8080", "tcp 0.0.0.0:8080", "udp 127.0.0.1:53",
                                         "udp 127.0.0.1:7002"]


def test_a_port_list_from_the_other_host_is_checked():
    import pytest

    for bad in (["sctp", "127.0.0.1", 1], ["tcp", "not-an-ip", 1], ["tcp", "127.0.0.1", "80"], "x"):
        with pytest.raises((ValueError, TypeError)):
            procfs.Port.from_json(bad)


MAPS = """\
55d0c0a00000-55d0c0a21000 r-xp 00000000 00:2c 1311 /bin/busybox
7f1c2a000000-7f1c2a001000 rw-s 00000000 00:2c 1400 /data/counter
7f1c2a001000-7f1c2a002000 r--s 00000000 00:2c 1401 /data/read-only-shared
7f1c2a002000-7f1c2a003000 rw-p 00000000 00:2c 1402 /data/private-copy
7f1c2a003000-7f1c2a004000 rw-s 00000000 00:2c 1403 /data/gone (deleted)
7f1c2a004000-7f1c2a005000 rw-s 00000000 00:01 1404 /dev/zero
7f1c2a005000-7f1c2a006000 rw-s 00000000 00:2c 1405 /tmp/with space
7f1c2a006000-7f1c2a007000 rw-p 00000000 00:00 0 [heap]
"""


def test_files_mapped_shared_and_writable_are_found_in_maps():
    assert procfs.shared_writable_mappings(MAPS) == {"/data/counter", "/dev/zero", "/tmp/with space"}
