# grun-unlearn's bad-input behaviour, as a user meets it: a clear message, a non-zero exit, and no
# partial adapter left behind. Tests that need the model skip (exit 77) when it is absent.
set(cli $<TARGET_FILE:grun-unlearn>)
set(cli_data ${PROJECT_SOURCE_DIR}/tests/data/cli)
set(cli_out ${CMAKE_CURRENT_BINARY_DIR}/cli-test-out)
file(MAKE_DIRECTORY ${cli_out})

add_test(NAME cli:missing_model COMMAND ${cli} train --model ${cli_out}/no-such-model.gguf --out ${cli_out}/a.safetensors)
set_tests_properties(cli:missing_model PROPERTIES WILL_FAIL ON)
add_test(NAME cli:missing_model_message COMMAND ${cli} train --model ${cli_out}/no-such-model.gguf --out ${cli_out}/a.safetensors)
set_tests_properties(cli:missing_model_message PROPERTIES PASS_REGULAR_EXPRESSION "no-such-model.gguf not found")

add_test(NAME cli:corrupt_model COMMAND ${cli} eval --model ${cli_data}/malformed.jsonl)
set_tests_properties(cli:corrupt_model PROPERTIES PASS_REGULAR_EXPRESSION "GGUF magic")

add_test(NAME cli:bad_flag COMMAND ${cli} train --gate sideways)
set_tests_properties(cli:bad_flag PROPERTIES WILL_FAIL ON)

# These read the model: the driver script skips (77) when it is absent, then checks exit code, message
# and that no adapter file (or temp file) is left.
set(driver ${CMAKE_CURRENT_SOURCE_DIR}/grun_unlearn/expect_failure.sh)
add_test(NAME cli:malformed_jsonl COMMAND bash ${driver} ${cli_out}/m "line 2|malformed.jsonl:2" ${cli} train --forget ${cli_data}/malformed.jsonl --steps 1 --out ${cli_out}/m/a.safetensors)
add_test(NAME cli:empty_forget COMMAND bash ${driver} ${cli_out}/e "expected at least one example" ${cli} train --forget ${cli_data}/empty.jsonl --steps 1 --out ${cli_out}/e/a.safetensors)
add_test(NAME cli:unwritable_out COMMAND bash ${driver} ${cli_out}/u "does not exist|not writable" ${cli} train --steps 1 --out ${cli_out}/u/no/such/dir/a.safetensors)
add_test(NAME cli:adapter_not_grun COMMAND bash ${driver} ${cli_out}/g "safetensors|format|header" ${cli} eval --adapter ${cli_data}/malformed.jsonl)
set_tests_properties(cli:malformed_jsonl cli:empty_forget cli:unwritable_out cli:adapter_not_grun PROPERTIES SKIP_RETURN_CODE 77)

# Settings refused before any long work (before the model is even read): no model needed.
add_test(NAME cli:out_is_directory COMMAND bash ${driver} --no-model ${cli_out}/d "--out: expected a file path, got .*which is a directory" ${cli} train --out ${cli_out}/d)
add_test(NAME cli:duplicate_layers COMMAND bash ${driver} --no-model ${cli_out}/l "--layers: expected distinct layers, got layer 5 twice" ${cli} train --layers 5,2,5 --out ${cli_out}/l/a.safetensors)
add_test(NAME cli:extra_named_like_a_split COMMAND bash ${driver} --no-model ${cli_out}/x "--extra elsewhere/retain.jsonl: expected a file name other than" ${cli} train --extra elsewhere/retain.jsonl --out ${cli_out}/x/a.safetensors)
add_test(NAME cli:json_is_the_adapter COMMAND bash ${driver} --no-model ${cli_out}/j "--json .*: expected a path other than the adapter's" ${cli} train --out ${cli_out}/j/r.json --json ${cli_out}/j/r.json)
add_test(NAME cli:bad_retain_loss COMMAND bash ${driver} --no-model ${cli_out}/r "--retain-loss" ${cli} train --retain-loss nl --out ${cli_out}/r/a.safetensors)
add_test(NAME cli:nan_learning_rate COMMAND bash ${driver} --no-model ${cli_out}/n "expected a finite number > 0, got nan" ${cli} train --lr nan --out ${cli_out}/n/a.safetensors)
