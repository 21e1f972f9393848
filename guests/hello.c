/* hello: the smallest useful guest. Prints two lines and exits 0. */
#include <pyvmmfw.h>

int main(void)
{
    printf("Hello from pyvmm guest\n");
    printf("ram=%luM cpus=%lu\n", fw_ram_bytes >> 20, fw_nr_cpus);
    return 0;
}
