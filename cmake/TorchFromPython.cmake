# FLASHCOMM_TORCH_FROM_PYTHON=ON: an imported `torch` target (plus TORCH_INSTALL_PREFIX,
# TORCH_CXX_FLAGS) from the torch that Python_EXECUTABLE imports, as torch's own CMake
# config would define it for this library (include dirs, the interface definitions of
# torch's targets, the C++ ABI flag, libtorch / libtorch_cpu / libc10), without that config
# and its CUDA toolkit detection. cmake/torch_from_python.py writes the definitions.
find_package(Python REQUIRED COMPONENTS Interpreter)
set(_flashcomm_torch_cmake "${CMAKE_CURRENT_BINARY_DIR}/torch_from_python.cmake")
execute_process(
  COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/torch_from_python.py"
          "${_flashcomm_torch_cmake}"
  RESULT_VARIABLE _flashcomm_rc)
if(NOT _flashcomm_rc EQUAL 0)
  message(FATAL_ERROR "${Python_EXECUTABLE} cmake/torch_from_python.py failed (${_flashcomm_rc})")
endif()
include("${_flashcomm_torch_cmake}")
message(STATUS "torch ${TORCH_VERSION} from ${Python_EXECUTABLE}: ${TORCH_INSTALL_PREFIX}")
