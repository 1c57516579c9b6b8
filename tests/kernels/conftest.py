def pytest_configure(config):
    config.addinivalue_line(
        "markers", "triton: Triton kernel test (runs under TRITON_INTERPRET=1 without a GPU)")
