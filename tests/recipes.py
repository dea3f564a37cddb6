"""The quantization recipes the tests build engines with, as trt-build / convert_checkpoint.py flags
(the calibrated ones calibrate on conftest's calib_file through the `engines` factory)."""

QUANT_RECIPES = {
    "w8a16": ["--use_weight_only", "--weight_only_precision", "int8"],
    "w4a16": ["--use_weight_only", "--weight_only_precision", "int4"],
    "w4a16_g32_zp": ["--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "32",
                     "--has_zero_point"],
    "w8a16_g32_zp": ["--use_weight_only", "--weight_only_precision", "int8", "--per_group", "--group_size", "32",
                     "--has_zero_point"],
    "gptq": ["--use_weight_only", "--weight_only_precision", "int4_gptq", "--per_group", "--group_size", "32"],
    "awq": ["--use_weight_only", "--weight_only_precision", "int4_awq", "--per_group", "--group_size", "32"],
    "sq_per_token": ["--smoothquant", "0.5", "--per_channel", "--per_token"],
    "sq_static": ["--smoothquant", "0.5", "--per_channel"],
    "sq_per_tensor": ["--smoothquant", "0.5"],
    "int8_kv": ["--int8_kv_cache"],
}
