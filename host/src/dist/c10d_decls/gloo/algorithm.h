// Declarations only (see ../README.txt): libtorch's ProcessGroupGloo.hpp includes this header,
// but nothing of it is needed to construct the process group and call its virtual collectives.
#pragma once
