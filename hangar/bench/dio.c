/*
 * hangar-dio: timed direct I/O on a block device, run inside a guest by `hangar bench volume`.
 *
 *   hangar-dio seqwrite|seqread|randwrite|randread DEVICE BLOCK_BYTES COUNT SPAN_BYTES SEED
 *
 * COUNT reads or writes of BLOCK_BYTES each, with O_DIRECT (the guest's page cache is not
 * measured), at consecutive offsets (seq*) or at offsets drawn by a xorshift generator from
 * SEED (rand*), all within the first SPAN_BYTES of DEVICE. Writes carry incompressible,
 * non-zero data and end with fdatasync, which is timed. Prints one line:
 *
 *   MODE BYTES MICROSECONDS
 *
 * busybox dd cannot do random I/O without one process per block, whose start costs more
 * than the I/O under emulation; this does the whole run in one process.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t state;

static uint64_t next_random(void)
{
	state ^= state << 13;
	state ^= state >> 7;
	state ^= state << 17;
	return state;
}

static uint64_t number(const char *text)
{
	char *end;
	uint64_t value = strtoull(text, &end, 10);
	if (*text == '\0' || *end != '\0') {
		fprintf(stderr, "hangar-dio: %s is not a number\n", text);
		exit(2);
	}
	return value;
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: hangar-dio seqwrite|seqread|randwrite|randread DEVICE "
				"BLOCK_BYTES COUNT SPAN_BYTES SEED\n");
		return 2;
	}
	const char *mode = argv[1];
	int writing = strcmp(mode, "seqwrite") == 0 || strcmp(mode, "randwrite") == 0;
	int random_offsets = strncmp(mode, "rand", 4) == 0;
	if (!writing && strcmp(mode, "seqread") != 0 && strcmp(mode, "randread") != 0) {
		fprintf(stderr, "hangar-dio: unknown mode %s\n", mode);
		return 2;
	}
	uint64_t block = number(argv[3]), count = number(argv[4]), span = number(argv[5]);
	state = number(argv[6]) * 2654435761u + 88172645463325252ull;
	if (block == 0 || block % 4096 != 0 || span < block) {
		fprintf(stderr, "hangar-dio: BLOCK_BYTES must be a multiple of 4096 within SPAN\n");
		return 2;
	}
	uint64_t blocks = span / block;

	int fd = open(argv[2], (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		perror(argv[2]);
		return 1;
	}
	uint64_t *buffer;
	if (posix_memalign((void **)&buffer, 4096, block) != 0) {
		perror("posix_memalign");
		return 1;
	}
	for (uint64_t i = 0; i < block / sizeof(uint64_t); i++)
		buffer[i] = next_random() | 1;

	struct timespec start, end;
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (uint64_t i = 0; i < count; i++) {
		uint64_t index = random_offsets ? next_random() % blocks : i % blocks;
		off_t offset = (off_t)(index * block);
		ssize_t done = writing ? pwrite(fd, buffer, block, offset)
				       : pread(fd, buffer, block, offset);
		if (done != (ssize_t)block) {
			perror(mode);
			return 1;
		}
	}
	if (writing && fdatasync(fd) != 0) {
		perror("fdatasync");
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &end);
	int64_t nanos = (int64_t)(end.tv_sec - start.tv_sec) * 1000000000 +
			(int64_t)(end.tv_nsec - start.tv_nsec);
	unsigned long long micros = (unsigned long long)(nanos / 1000);
	printf("%s %llu %llu\n", mode, (unsigned long long)(count * block), micros);
	return 0;
}
