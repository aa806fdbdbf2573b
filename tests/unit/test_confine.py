from runtime import confine

DOCKER_DEFAULT = 0xA80425FB  # CapEff of a default `docker run` container
CAP_MKNOD = 27


def test_kept_capabilities_are_dockers_default_less_mknod():
    assert confine.KEPT_MASK == DOCKER_DEFAULT & ~(1 << CAP_MKNOD)
    assert len(confine.CAPS) == bin(DOCKER_DEFAULT).count("1") - 1
