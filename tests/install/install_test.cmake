# The installed C++ package, as a user gets it (ctest label "install"):
#  1. `cmake --install` the build tree into a temporary prefix, then move the prefix elsewhere
#     (the package must be relocatable) and check that no installed CMake file names the source
#     or build directory;
#  2. configure and build examples/cpp against the moved prefix with find_package(voken);
#  3. write a tiny random-weight bundle with the installed `voken` CLI and run the example on it
#     with a text + image prompt: it must print text and save a PNG.
#
# cmake -DVOKEN_SOURCE_DIR=... -DVOKEN_BUILD_DIR=... -DWORK_DIR=... -DTorch_DIR=...
#       -DGENERATOR=... -DCXX_COMPILER=... -P install_test.cmake
foreach(variable VOKEN_SOURCE_DIR VOKEN_BUILD_DIR WORK_DIR GENERATOR)
  if(NOT DEFINED ${variable})
    message(FATAL_ERROR "install_test.cmake: -D${variable}=... is required")
  endif()
endforeach()

# Runs a command; stops the test with its output when it fails.
function(run step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${step} failed (${status}):\n${ARGN}\n--- stdout\n${out}\n--- stderr\n${err}")
  endif()
  message(STATUS "${step}: ok")
  set(LAST_OUTPUT "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(staged "${WORK_DIR}/staged")
set(prefix "${WORK_DIR}/moved prefix")  # a space in the path, as users have

# 1. Install, move, look at what was installed.
run("install" "${CMAKE_COMMAND}" --install "${VOKEN_BUILD_DIR}" --prefix "${staged}")
file(RENAME "${staged}" "${prefix}")
foreach(required include/voken/voken.h include/voken/pipeline.h bin/voken)
  if(NOT EXISTS "${prefix}/${required}")
    message(FATAL_ERROR "the installed tree lacks ${required}")
  endif()
endforeach()
file(GLOB_RECURSE package_files "${prefix}/*/cmake/voken/*.cmake")
if(NOT package_files)
  message(FATAL_ERROR "no CMake package files under ${prefix}/*/cmake/voken")
endif()
foreach(file ${package_files})
  file(READ "${file}" text)
  foreach(forbidden "${VOKEN_SOURCE_DIR}" "${VOKEN_BUILD_DIR}" "${staged}")
    string(FIND "${text}" "${forbidden}" found)
    if(NOT found EQUAL -1)
      message(FATAL_ERROR "${file} names ${forbidden}: the package is not relocatable")
    endif()
  endforeach()
endforeach()
# The public headers must not need libtorch's (a user's program compiles without ATen).
file(GLOB public_headers "${prefix}/include/voken/*.h")
foreach(header ${public_headers})
  file(STRINGS "${header}" includes REGEX "#include")
  foreach(line ${includes})
    if(line MATCHES "ATen|torch/|c10/")
      message(FATAL_ERROR "${header} includes a libtorch header: ${line}")
    endif()
  endforeach()
endforeach()
run("installed voken info" "${prefix}/bin/voken" info)

# 2. The example against the moved prefix.
set(prefix_path "${prefix}")
if(Torch_DIR)
  set(torch_arguments "-DTorch_DIR=${Torch_DIR}")
endif()
if(CXX_COMPILER)
  set(compiler_arguments "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
run("configure examples/cpp" "${CMAKE_COMMAND}" -S "${VOKEN_SOURCE_DIR}/examples/cpp" -B "${WORK_DIR}/example"
    -G "${GENERATOR}" -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${prefix_path}" ${torch_arguments}
    ${compiler_arguments})
run("build examples/cpp" "${CMAKE_COMMAND}" --build "${WORK_DIR}/example")

# 3. Run it on a tiny random-weight bundle written by the installed CLI.
run("voken demo --bundle-only" "${prefix}/bin/voken" demo --dir "${WORK_DIR}/bundle" --bundle-only)
file(MAKE_DIRECTORY "${WORK_DIR}/out")
run("voken_example" "${WORK_DIR}/example/voken_example" "${WORK_DIR}/bundle/bundle.json"
    --text "Here is a picture:" --image "${WORK_DIR}/bundle/input.png" --text "What happens next?"
    --out "${WORK_DIR}/out" --steps 2 --max-new-tokens 12 --size 64 --force-image --seed 1)
message(STATUS "voken_example printed:\n${LAST_OUTPUT}")
if(NOT LAST_OUTPUT MATCHES "generated tokens")
  message(FATAL_ERROR "voken_example printed no summary")
endif()
if(NOT EXISTS "${WORK_DIR}/out/image_1.png")
  message(FATAL_ERROR "voken_example saved no image (force_image was set)")
endif()
file(READ "${WORK_DIR}/out/image_1.png" signature LIMIT 4 HEX)
if(NOT signature STREQUAL "89504e47")
  message(FATAL_ERROR "image_1.png is not a PNG (starts with ${signature})")
endif()

file(REMOVE_RECURSE "${WORK_DIR}")
message(STATUS "installed package, example build and run: ok")
