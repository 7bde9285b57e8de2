# ctest's consumer_project: install the build into a fresh prefix, configure and
# build tests/cpp/consumer against it with find_package(flashcomm), and run it. The
# installed library must carry no absolute RUNPATH.
# -D: BUILD_DIR, SOURCE_DIR, WORK_DIR, TORCH_PREFIX (Torch_DIR), GLOO_INCLUDE_DIR, GENERATOR,
# SANITIZE (the library was built with ASan + UBSan: so is the consumer, whose executable
# must then bring the ASan runtime first).
file(REMOVE_RECURSE ${WORK_DIR})
function(step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer_project: '${ARGN}' failed (${rc}):\n${out}\n${err}")
  endif()
endfunction()
step(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix)
# The installed library is relocatable: its RUNPATH holds no absolute path (the build
# machine's torch); the consumer below finds torch through its own link.
file(GLOB installed_lib ${WORK_DIR}/prefix/lib*/libflashcomm_ops.so)
file(READ_ELF "${installed_lib}" RUNPATH installed_runpath RPATH installed_rpath)
if("${installed_runpath};${installed_rpath}" MATCHES "(^|[;:])/")
  message(FATAL_ERROR "consumer_project: ${installed_lib} has an absolute RUNPATH/RPATH "
                      "entry: '${installed_runpath}' '${installed_rpath}'")
endif()
message(STATUS "installed library RUNPATH: ${installed_runpath}")
set(san_flags "")
if(SANITIZE)
  set(san_flags -DCMAKE_CXX_FLAGS=-fsanitize=address,undefined
                -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined)
endif()
step(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/cpp/consumer -B ${WORK_DIR}/build -G ${GENERATOR}
     -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
     -DTorch_DIR=${TORCH_PREFIX} -DGLOO_INCLUDE_DIR=${GLOO_INCLUDE_DIR} ${san_flags})
step(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
execute_process(COMMAND ${WORK_DIR}/build/flashcomm_consumer RESULT_VARIABLE rc
                OUTPUT_VARIABLE out ERROR_VARIABLE err)
message(STATUS "${out}")
if(NOT rc EQUAL 0 OR NOT out MATCHES "flashcomm consumer: ok")
  message(FATAL_ERROR "consumer_project: the consumer failed (${rc}):\n${out}\n${err}")
endif()
