// Owns the precompiled header that every test target reuses (see tests/CMakeLists.txt).
