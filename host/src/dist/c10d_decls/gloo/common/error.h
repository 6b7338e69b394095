// Declarations only (see ../../README.txt).
#pragma once
