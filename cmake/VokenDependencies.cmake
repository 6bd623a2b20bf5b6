# Third-party dependencies, all from the system (Debian packages here). A user's own libtorch
# (e.g. CUDA) is picked up through CMAKE_PREFIX_PATH.
find_package(Torch REQUIRED)
find_package(nlohmann_json 3.9 REQUIRED)
find_package(Threads REQUIRED)
find_package(ZLIB REQUIRED)

# No sentencepiece library: Debian's libsentencepiece.so embeds its own copy of protobuf-lite and
# exports those symbols, which clash with the libprotobuf that libtorch loads (segfault in static
# initialisation as soon as both are in one process). voken reads tokenizer.model itself
# (src/text/), the way llama.cpp does; the tests cross-check it against Python sentencepiece.

# OpenCV: its CMake package comes with the full libopencv-dev; accept the three component
# packages alone (core, imgproc, imgcodecs) by locating them directly.
add_library(voken_opencv INTERFACE)
find_package(OpenCV QUIET COMPONENTS core imgproc imgcodecs)
if(OpenCV_FOUND)
  target_include_directories(voken_opencv INTERFACE ${OpenCV_INCLUDE_DIRS})
  target_link_libraries(voken_opencv INTERFACE ${OpenCV_LIBS})
else()
  find_path(VOKEN_OPENCV_INCLUDE_DIR opencv2/imgcodecs.hpp PATH_SUFFIXES opencv4 REQUIRED)
  foreach(component core imgproc imgcodecs)
    find_library(VOKEN_OPENCV_${component} opencv_${component} REQUIRED)
    target_link_libraries(voken_opencv INTERFACE ${VOKEN_OPENCV_${component}})
  endforeach()
  target_include_directories(voken_opencv INTERFACE ${VOKEN_OPENCV_INCLUDE_DIR})
endif()

# Python: Debian's interpreter (with numpy/pytest/PIL) unless told otherwise.
if(NOT DEFINED Python_EXECUTABLE AND EXISTS /usr/bin/python3)
  set(Python_EXECUTABLE /usr/bin/python3)
endif()
find_package(Python 3.8 COMPONENTS Interpreter Development.Module)
